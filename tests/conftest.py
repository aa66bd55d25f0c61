"""Shared test setup: the ``gpu`` marker (tests skipped when no CUDA device is present)."""

import os

import pytest
import torch

# The CPU tests use small tensors, for which torch's intra-op thread pool costs far more than
# it gains: on the 2-core CI machine an fp64->fp32 cast of 64K elements took 8 ms with 2
# threads and 0.01 ms with 1 (measured, torch 2.13).
torch.set_num_threads(int(os.environ.get("SAGEATTN_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
