"""The README is a document that runs: its Python blocks, in order, as one script (in a scratch folder, which the
examples write into: moe_ckpt/, old_run/)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 8  # the finder sees the blocks (the test below is not vacuous)


def test_readme_python_blocks_run_top_to_bottom_in_one_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(), start=1):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README python block {i} fails: {type(err).__name__}: {err}\n{block}") from err
    assert (tmp_path / "moe_ckpt" / "dylora_moe_config.json").is_file()
