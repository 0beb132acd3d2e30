"""Which implementation runs: the Triton kernel on CUDA, the PyTorch reference elsewhere.

``backend`` (an argument) wins over the environment variable ``KVC_KERNELS`` (``triton``, ``torch`` or
``auto``, the default). ``auto`` picks Triton when it is installed and the tensors are on CUDA. Forcing
``triton`` on CPU needs ``TRITON_INTERPRET=1`` (the interpreter, for tests) set before triton is imported.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV = "KVC_KERNELS"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: torch.device, backend: str | None = None) -> str:
    """``triton`` or ``torch`` for tensors on ``device``."""
    choice = backend or os.environ.get(ENV, "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV} / backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    usable = triton_available() and (device.type == "cuda" or interpreting())
    if choice == "triton" and not usable:
        why = "triton is not installed" if not triton_available() else f"device {device} needs TRITON_INTERPRET=1"
        raise RuntimeError(f"{ENV}=triton requested but {why}")
    return "triton" if usable and (choice == "triton" or device.type == "cuda") else "torch"
