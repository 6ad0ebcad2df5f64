"""docs/export.md runs: its Python blocks, in order, as one script in a scratch folder."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "export.md"


def test_export_page_python_blocks_run_top_to_bottom(tmp_path, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_export"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/export.md python block {i}", "exec"), namespace)
    assert (tmp_path / "served" / "expert_0" / "adapter_config.json").is_file()
