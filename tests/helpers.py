"""What tests import from one another: the device they run on, the GPU marker and the shared-data marker (pytest
discourages importing conftest.py, which only sets the session up)."""

import pytest
import torch
from train_support import HAS_SHARED_DATA, SHARED_DATA_DIR

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bf16 Triton math is only exact on a GPU)")

# Tests of the real MBPP file's task ids and solutions; the others run on the synthetic corpus of a clone without it.
needs_shared_mbpp = pytest.mark.skipif(
    not HAS_SHARED_DATA, reason=f"reads the real MBPP file (its task ids and solutions), not at {SHARED_DATA_DIR}"
)
