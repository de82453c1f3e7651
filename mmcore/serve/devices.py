"""``mmcore serve --device auto|cpu|cuda[:N]``: checked before the port is bound, spread over GPUs.

A bundle runs through onnxruntime, which needs its CUDA build (``onnxruntime-gpu``, whose
``CUDAExecutionProvider`` must be available); a run directory runs through PyTorch. Asking for
CUDA where it cannot be had is one line (exit 1), never a quiet fallback to the CPU. ``cuda``
with several workers gives worker ``i`` the device ``cuda:(i % number of visible GPUs)``.
"""

from __future__ import annotations

import re

from mmcore.errors import MmcoreError

DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


class DeviceError(MmcoreError):
    """The device asked for cannot be had here (exit 1)."""


def cuda_problem(kind):
    """Why CUDA cannot serve a ``kind`` ("bundle" or "run") here, or None when it can."""
    import torch

    if kind == "bundle":
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return (f"onnxruntime has no CUDAExecutionProvider (available: {', '.join(providers)}); "
                    f"install onnxruntime-gpu in place of onnxruntime")
        return None
    if not torch.cuda.is_available():
        return f"PyTorch sees no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
    return None


def visible_gpus():
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device, kind):
    """``--device`` -> ``(device, gpus)``: "cpu", "cuda" or "cuda:N", and the GPUs to spread over.

    Raises :class:`DeviceError` for a CUDA device that cannot be had.
    """
    if not DEVICE_RE.fullmatch(device):
        raise DeviceError(f"mmcore serve: --device {device}: must be auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return "cpu", 0
    problem = cuda_problem(kind)
    if device == "auto":
        return ("cpu", 0) if problem else ("cuda", max(visible_gpus(), 1))
    if problem:
        raise DeviceError(f"mmcore serve: --device {device}: {problem}")
    gpus = max(visible_gpus(), 1)
    if ":" in device and int(device.split(":")[1]) >= gpus:
        raise DeviceError(f"mmcore serve: --device {device}: only {gpus} CUDA device(s) visible (cuda:0..cuda:{gpus - 1})")
    return device, gpus


def worker_device(device, gpus, number):
    """The device of worker ``number``: ``cuda`` spreads workers over ``gpus`` devices."""
    if device == "cuda" and gpus > 0:
        return f"cuda:{number % gpus}"
    return device
