"""Blocking host-to-device transfers made visible on a CPU.

On a GPU, ``torch.tensor(python_data, device="cuda")`` (also ``as_tensor`` / ``asarray`` of Python
data) and ``tensor.to("cuda")`` without ``non_blocking=True`` copy from host memory and make the host
wait for the device's queue: a stall in every step they run in (``torch.cuda.set_sync_debug_mode``
reports them on a GPU). :class:`BlockingTransfers` is a ``TorchFunctionMode`` that records these calls
whenever they name ``device``, the accelerator's device, which on a CPU run is ``cpu``: it sees the
calls, not the memory, so the same code that would stall a GPU is caught on the CPU. A copy made by
torch itself is left out: torch's own ``.to(device)`` calls (``clip_grad_norm_`` gathering the
per-tensor norms on the first gradient's device) move tensors already on the device.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

FROM_PYTHON_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
COPIES = {torch.Tensor.to, torch.Tensor.cuda}
HERE = Path(__file__).resolve()


def _is_device(value) -> bool:
    return isinstance(value, (str, torch.device)) and not isinstance(value, torch.dtype)


class BlockingTransfers(TorchFunctionMode):
    """Records ``(function, call site)`` for each blocking host-to-``device`` transfer (see the
    module docstring) made while the mode is active; ``call site`` is the innermost frame outside
    torch, ``file:line``."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.calls: list[tuple[str, str]] = []

    def _names_device(self, value) -> bool:
        if not _is_device(value):
            return False
        device = torch.device(value)
        return device.type == self.device.type and (device.index is None or self.device.index is None
                                                    or device.index == self.device.index)

    def _blocking(self, func, args, kwargs) -> bool:
        if func in FROM_PYTHON_DATA:
            return bool(args) and not isinstance(args[0], torch.Tensor) and self._names_device(kwargs.get("device"))
        if func in COPIES:
            device = kwargs.get("device", next((arg for arg in args[1:] if _is_device(arg)), None))
            non_blocking = kwargs.get("non_blocking", any(arg is True for arg in args[1:]))
            return (func is torch.Tensor.cuda or self._names_device(device)) and not non_blocking \
                and not _called_from_torch()
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._blocking(func, args, kwargs):
            self.calls.append((getattr(func, "__qualname__", str(func)), call_site()))
        return func(*args, **kwargs)


def _called_from_torch() -> bool:
    """Whether the function the mode intercepts was called by torch's own code."""
    frame = sys._getframe(3)  # _called_from_torch <- _blocking <- __torch_function__ <- ...
    while frame is not None and frame.f_code.co_filename.endswith(("torch/overrides.py", "torch/_tensor.py")):
        frame = frame.f_back
    return frame is not None and "/torch/" in frame.f_code.co_filename


def call_site() -> str:
    """The innermost frame of the stack that is neither torch nor this file."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = frame.filename
        if "/torch/" not in path and Path(path).resolve() != HERE:
            return f"{path}:{frame.lineno}"
    return "?"
