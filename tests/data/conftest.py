"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Intra-op threads only slow the data tests' tiny ops down on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _forget_failed_downloads():
    """``source=auto`` remembers failed downloads per process; each test starts afresh."""
    from src.data import banana

    banana._FAILED_DOWNLOADS.clear()
    yield
    banana._FAILED_DOWNLOADS.clear()
