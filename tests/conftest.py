"""Shared test set-up: offline and quiet integrations, a seed per test, the device list and the GPU marker.

On a machine without CUDA the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported; this file does that, so a plain ``pytest`` works the same as ``.ci/run``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bf16 Triton math is only exact on a GPU)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    if HAS_CUDA:
        torch.cuda.manual_seed_all(0)
    yield


@pytest.fixture
def device():
    return DEVICE
