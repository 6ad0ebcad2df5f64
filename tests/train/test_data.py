"""Corpora, splits, packing and the offline tiny model + tokenizer (dylora_moe.corpora,
dylora_moe.train.data, dylora_moe.base_models)."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dylora_moe.base_models import (
    ModelLoadError,
    TinyConfig,
    load_or_build_tiny,
    load_pretrained,
    train_tokenizer,
)
from dylora_moe.corpora import DataError, load_domain
from dylora_moe.train.data import build_corpus, pack, subset, training_texts

DATA_DIR = Path(os.environ.get("DYLORA_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"shared corpora not found at {DATA_DIR}")


def needs_datasets():
    """The splits and the hub loader use ``datasets`` (the train extra); GPU images may lack it."""
    pytest.importorskip("datasets", reason="needs the datasets package (pip install -e '.[train]')")


def _write_corpora(folder: Path, n_alpaca: int = 40, n_mbpp: int = 30) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    alpaca = [
        {"instruction": f"Task {i}: add {i} and 1", "input": "", "output": f"def f():\n    return {i} + 1"}
        for i in range(n_alpaca)
    ]
    (folder / "code_alpaca_2k.json").write_text(json.dumps(alpaca))
    mbpp = [{"task_id": i, "text": f"Write a function number {i}.", "code": "pass"} for i in range(n_mbpp)]
    (folder / "mbpp.jsonl").write_text("\n".join(json.dumps(r) for r in mbpp) + "\n")
    return folder


def _train_test_split_formula(n: int, test_size: float, seed: int = 42) -> tuple[list[int], list[int]]:
    """``datasets``' split written out: a numpy permutation; the first ceil(test_size * n) indices are the test set."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = math.ceil(test_size * n)
    return perm[n_test:].tolist(), perm[:n_test].tolist()


def test_splits_are_the_originals(tmp_path):
    needs_datasets()
    # The split must equal the original script's (datasets.train_test_split, seed 42) on the same rows.
    folder = _write_corpora(tmp_path / "data")
    alpaca = load_domain(folder, "code_alpaca")
    train_idx, val_idx = _train_test_split_formula(40, 0.1)
    assert alpaca.texts["validation"] == [f"Task {i}: add {i} and 1\ndef f():\n    return {i} + 1" for i in val_idx]
    assert len(alpaca.texts["train"]) == len(train_idx) == 36

    mbpp = load_domain(folder, "mbpp")
    train_idx, rest_idx = _train_test_split_formula(30, 0.2)
    val_pos, test_pos = _train_test_split_formula(len(rest_idx), 0.5)
    assert mbpp.texts["train"] == [f"Write a function number {i}." for i in train_idx]
    assert mbpp.texts["validation"] == [f"Write a function number {rest_idx[p]}." for p in val_pos]
    assert mbpp.texts["test"] == [f"Write a function number {rest_idx[p]}." for p in test_pos]
    assert load_domain(folder, "mbpp").texts == mbpp.texts  # deterministic


@needs_data
def test_shared_corpora_split_sizes():
    # 2017 Code Alpaca rows -> 1815/202; 427 MBPP rows -> 341/43/43 (the sizes of the two corpus files).
    alpaca, mbpp = load_domain(DATA_DIR, "code_alpaca"), load_domain(DATA_DIR, "mbpp")
    assert {k: len(v) for k, v in alpaca.texts.items()} == {"train": 1815, "validation": 202}
    assert {k: len(v) for k, v in mbpp.texts.items()} == {"train": 341, "validation": 43, "test": 43}


def test_subset_percent():
    rows = [str(i) for i in range(10)]
    assert subset(rows, 25) == ["0", "1", "2"]  # ceil(2.5)
    assert subset(rows, 1) == ["0"]  # never empty
    assert subset(rows, 100) == rows
    with pytest.raises(ValueError, match="subset percent"):
        subset(rows, 0)


class _CharTokenizer:
    """One token per character (ids 3..), EOS 2, pad 0: packing is checked without a trained tokenizer."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + ord(c) % 50 for c in t] for t in texts]}


def test_pack_round_trips_and_masks_padding():
    texts = ["abc", "hello world", "x" * 9, "zz"]
    data = pack(texts, _CharTokenizer(), max_length=8)
    stream = [tok for t in texts for tok in (*[3 + ord(c) % 50 for c in t], 2)]
    assert len(data) == math.ceil(len(stream) / 8) == 4
    rows = [data[i] for i in range(len(data))]
    kept = torch.cat([r["input_ids"][r["attention_mask"].bool()] for r in rows]).tolist()
    assert kept == stream  # every token once, in order, EOS after each text
    last = rows[-1]
    n_real = len(stream) - 3 * 8
    assert last["attention_mask"].tolist() == [1] * n_real + [0] * (8 - n_real)
    assert (last["labels"][n_real:] == -100).all() and (last["labels"][:n_real] == last["input_ids"][:n_real]).all()
    assert all((r["labels"] == r["input_ids"]).all() for r in rows[:-1])  # full rows: nothing masked
    assert data.num_tokens == len(stream)


def test_missing_data_dir_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"does-not-exist does not exist; expected a folder with code_alpaca_2k.json"):
        load_domain(tmp_path / "does-not-exist", "code_alpaca")


def test_missing_file_lists_what_was_found(tmp_path):
    folder = _write_corpora(tmp_path / "data")
    (folder / "mbpp.jsonl").unlink()
    with pytest.raises(DataError, match=r"no mbpp file: expected one of mbpp.jsonl, mbpp.json \(found: code_alpaca"):
        load_domain(folder, "mbpp")


def test_malformed_json_line_names_file_and_line(tmp_path):
    folder = _write_corpora(tmp_path / "data")
    lines = (folder / "mbpp.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-3]  # cut the closing of line 5
    (folder / "mbpp.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"mbpp.jsonl line 5: invalid JSON"):
        load_domain(folder, "mbpp")


def test_missing_field_names_row_and_field(tmp_path):
    folder = _write_corpora(tmp_path / "data")
    rows = json.loads((folder / "code_alpaca_2k.json").read_text())
    del rows[7]["output"]
    (folder / "code_alpaca_2k.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"code_alpaca_2k.json row 7: missing or non-string field 'output'"):
        load_domain(folder, "code_alpaca")
    (folder / "code_alpaca_2k.json").write_text("[{]")
    with pytest.raises(DataError, match=r"code_alpaca_2k.json: invalid JSON"):
        load_domain(folder, "code_alpaca")


def test_tokenizer_is_byte_level_and_round_trips():
    tok = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300)
    text = "print('héllo ∑ 世界')\n\tx = 1  # unseen bytes still encode"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "</s>" and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_tiny_model_is_cached_and_reloads_identically(tmp_path):
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(50)]
    config = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, vocab_size=320)
    model, tok, folder = load_or_build_tiny(tmp_path, texts, config)
    assert model.config.hidden_size == 32 and len(tok) <= 320 and (folder / "tokenizer.json").is_file()
    again, tok2, folder2 = load_or_build_tiny(tmp_path, texts, config)
    assert folder2 == folder and tok2.get_vocab() == tok.get_vocab()
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name
    # Another text gives another folder (the tokenizer is trained on it), never a stale cache hit.
    assert load_or_build_tiny(tmp_path, texts[:10], config)[2] != folder
    assert len(list(tmp_path.glob(".tiny-*"))) == 0  # no staging folder left behind


def test_corpus_packs_training_and_eval_sets(tmp_path):
    needs_datasets()
    folder = _write_corpora(tmp_path / "data")
    splits = [load_domain(folder, d) for d in ("code_alpaca", "mbpp")]
    tok = train_tokenizer(training_texts(splits), vocab_size=300)
    corpus = build_corpus(splits, tok, max_length=16, training_subset=50, eval_subset=100)
    assert sorted(corpus.train_texts) == sorted(
        subset(splits[0].texts["train"], 50) + subset(splits[1].texts["train"], 50)
    )
    assert set(corpus.eval) == {"code_alpaca", "mbpp"}
    assert corpus.eval["mbpp"].num_tokens == sum(len(tok(t)["input_ids"]) + 1 for t in splits[1].texts["validation"])


def test_unknown_model_offline_says_hub_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"cannot reach the Hugging Face hub.*--model_name /path/to/model"):
        load_pretrained("no-such-org/no-such-model")


def test_hub_source_offline_says_what_to_pass(monkeypatch):
    needs_datasets()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"could not load google-research-datasets/mbpp from the hub.*pass --data_dir"):
        load_domain("hub", "mbpp")


def test_local_files_are_read_through_datasets(tmp_path, monkeypatch):
    needs_datasets()
    import datasets

    folder = _write_corpora(tmp_path / "data")
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    mbpp = load_domain(folder, "mbpp")
    assert calls == [(("json",), {"data_files": str(folder / "mbpp.jsonl"), "split": "train"})]
    assert sorted(mbpp.texts["train"] + mbpp.texts["validation"] + mbpp.texts["test"]) == sorted(
        f"Write a function number {i}." for i in range(30)
    )


def test_json_lines_missing_field_names_the_line(tmp_path):
    needs_datasets()
    folder = _write_corpora(tmp_path / "data")
    lines = (folder / "mbpp.jsonl").read_text().splitlines()
    lines[11] = json.dumps({"task_id": 11, "code": "pass"})  # no problem statement
    (folder / "mbpp.jsonl").write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")  # a blank line shifts rows
    with pytest.raises(DataError, match=r"mbpp.jsonl line 13: missing string field 'text'"):
        load_domain(folder, "mbpp")


def test_missing_datasets_package_is_named(tmp_path, monkeypatch):
    """Without ``datasets`` (the lent GPU image has none) reading a corpus says which package to install, not that
    the file is malformed."""
    from dylora_moe.corpora import MissingDatasetsError, load_domain

    data = tmp_path / "data"
    data.mkdir()
    (data / "mbpp.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ModuleNotFoundError
    with pytest.raises(MissingDatasetsError, match="pip install datasets"):
        load_domain(data, "mbpp")
