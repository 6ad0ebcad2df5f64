"""What the train.py tests share: the corpora and the tiny settings of a run that takes seconds."""

import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


SHARED_DATA_DIR = Path(os.environ.get("DYLORA_DATA_DIR") or REPO.parent / "shared" / "data")
HAS_SHARED_DATA = SHARED_DATA_DIR.is_dir()


def _corpora_dir() -> Path:
    """The shared corpora (``$DYLORA_DATA_DIR`` or ../shared/data, as train.py's default). A clone with neither
    gets a synthetic pair of files in the same formats and sizes, so these tests run everywhere."""
    if HAS_SHARED_DATA:
        return SHARED_DATA_DIR
    folder = Path(tempfile.mkdtemp(prefix="dylora-corpora-"))
    alpaca = [
        {"instruction": f"Write a function that adds {i} to a number.", "input": "" if i % 2 else f"x = {i}",
         "output": f"def add_{i}(x):\n    return x + {i}"}
        for i in range(2017)
    ]  # fmt: skip
    (folder / "code_alpaca_2k.json").write_text(json.dumps(alpaca))
    mbpp = [
        {"task_id": i, "text": f"Write a python function to multiply a number by {i}.",
         "code": f"def mul_{i}(x):\r\n    return x * {i}", "test_list": [f"assert mul_{i}(1) == {i}"],
         "test_setup_code": ""}
        for i in range(2, 429)
    ]  # fmt: skip
    (folder / "mbpp.jsonl").write_text("\n".join(json.dumps(row) for row in mbpp) + "\n")
    return folder


DATA_DIR = _corpora_dir()

TINY = [
    "--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_vocab_size", "300", "--max_length", "64",
    "--num_experts", "2", "--training_subset", "3", "--eval_subset", "5", "--batch_size", "4",
    "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none", "--data_dir", str(DATA_DIR),
]  # fmt: skip
