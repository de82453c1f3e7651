"""Where a scorer runs: ``--device auto|cpu|cuda[:N]`` for ``predict``, ``serve`` and the scorers.

``auto`` takes the GPU when there is one (CUDA in torch for a run directory; onnxruntime's
``CUDAExecutionProvider`` for a bundle) and the CPU otherwise. ``cuda`` and ``cuda:N`` are a
request, never silently downgraded: where CUDA cannot be had the scorer refuses to start with
one line saying why and what to install (exit 1, like a missing optional package).
"""

from __future__ import annotations

import re

from mmcore.errors import MmcoreError

#: what ``--device`` accepts
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
#: the install line of the GPU build of onnxruntime (it replaces the CPU build; never both)
GPU_INSTALL = "bash scripts/install.sh --gpu (or pip uninstall onnxruntime && pip install 'mmcore[serve-gpu]')"


class DeviceUnavailable(MmcoreError):
    """``--device`` asks for a device this machine (or this onnxruntime build) cannot give."""


def parse_device(spec):
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> itself (``None`` reads as ``auto``); anything else is one line."""
    spec = "auto" if spec is None else str(spec).strip().lower()
    if not _DEVICE.fullmatch(spec):
        raise MmcoreError(f"--device {spec}: expected {DEVICE_CHOICES}")
    return spec


def cuda_index(spec):
    """The GPU index of ``cuda``/``cuda:N`` (0 for plain ``cuda``)."""
    return int(spec.partition(":")[2] or 0)


def torch_device(spec):
    """The torch device for ``spec``; CUDA asked for where torch has none (or not that GPU) is one line."""
    import torch

    spec = parse_device(spec)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {spec}: CUDA is not available to torch here "
                                f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu or auto")
    index = cuda_index(spec)
    if index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"--device {spec}: this machine has {torch.cuda.device_count()} visible GPU(s) "
                                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def onnx_providers(spec, available):
    """onnxruntime's providers for ``spec`` given the ``available`` ones (``get_available_providers()``)."""
    spec = parse_device(spec)
    cuda = "CUDAExecutionProvider" in available
    if spec == "cpu" or (spec == "auto" and not cuda):
        return ["CPUExecutionProvider"]
    if not cuda:
        raise DeviceUnavailable(
            f"--device {spec}: this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)}); "
            f"install the GPU build: {GPU_INSTALL}")
    return [("CUDAExecutionProvider", {"device_id": cuda_index(spec) if spec != "auto" else 0}), "CPUExecutionProvider"]
