"""Shared test settings and fixtures."""

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """The tests use tiny tensors: a second intra-op thread buys nothing, and on a busy 2-core
    machine every op then waits for a descheduled thread (tests measured 20-50x slower).
    Subprocess tests (train.py, accelerate launch) choose their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eval_script():
    """eval.py as a module (a script, not part of the package), loaded once for every test file."""
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
