"""Shared test set-up: offline and quiet integrations, a seed per test, the device fixture (tests import the device
and the GPU marker from tests/helpers.py).

Machines without the ``datasets`` package (the lent GPU image has none) skip, with that reason, the tests that read
the corpora: whole files that train end to end, and any other test that stops on the missing package.

On a machine without CUDA the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported; this file does that, so a plain ``pytest`` works the same as ``.ci/run``.
"""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from helpers import DEVICE, HAS_CUDA  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    if HAS_CUDA:
        torch.cuda.manual_seed_all(0)
    yield


@pytest.fixture
def device():
    return DEVICE


HAS_DATASETS = importlib.util.find_spec("datasets") is not None
NEEDS_DATASETS = "needs the datasets package to read the corpora (not installed here: pip install datasets)"
# Files whose tests run train.py end to end (in process or as subprocesses) or read the corpora.
TRAINING_FILES = {
    "test_data.py",
    "test_faults_train.py",
    "test_gemma_job.py",
    "test_sweep.py",
    "test_train.py",
    "test_train_report.py",
}


def pytest_collection_modifyitems(config, items):
    if HAS_DATASETS:
        return
    for item in items:
        if item.path.name in TRAINING_FILES:
            item.add_marker(pytest.mark.skip(reason=NEEDS_DATASETS))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without ``datasets``, a test of another file that stops on the missing package is a skip, not a failure."""
    outcome = yield
    report = outcome.get_result()
    if HAS_DATASETS or call.excinfo is None or report.outcome != "failed":
        return
    err = call.excinfo.value
    while err is not None:
        if type(err).__name__ == "MissingDatasetsError" or getattr(err, "name", None) == "datasets":
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {NEEDS_DATASETS}")
            return
        err = err.__cause__ or err.__context__
