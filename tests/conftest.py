"""Shared fixtures: tiny random-initialised models of every supported family."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from moepaper.testbed.tiny import FAMILIES, PAPER_FAMILIES, random_batch, tiny_model

# one thread: tiny models are dominated by thread overhead (20-60x slower with 2 on a busy machine)
torch.set_num_threads(1)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    """Every supported family, one test per family."""
    return request.param


@pytest.fixture(params=list(PAPER_FAMILIES))
def paper_family(request) -> str:
    """The paper's four families."""
    return request.param


@pytest.fixture
def model(family):
    """A tiny model of `family` (8 experts, top-2, 3 decoder layers), in eval mode."""
    return tiny_model(family)


@pytest.fixture
def batch():
    """Two sequences of 12 tokens; the last 3 of row 0 are padding."""
    return random_batch(batch=2, seq_len=12, pad_last=3)
