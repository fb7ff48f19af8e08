"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """The tests use tiny tensors: a second intra-op thread buys nothing, and on a busy 2-core
    machine every op then waits for a descheduled thread (tests measured 20-50x slower).
    Subprocess tests (train.py, accelerate launch) choose their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
