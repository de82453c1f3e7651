"""Where a scorer runs: ``--device auto|cpu|cuda[:N]`` for ``predict``, ``eval``, ``serve`` and the scorers.

``auto`` takes the GPU when there is one (CUDA in torch for a run directory; onnxruntime's
``CUDAExecutionProvider`` for a bundle) and the CPU otherwise. ``cuda`` and ``cuda:N`` are a
request, never silently downgraded: where CUDA cannot be had the scorer refuses to start with
one line saying why and what to install (:class:`DeviceUnavailable`, exit 1, like a missing
optional package). This module only reads the words (no torch): the CLI checks them as it parses;
:func:`mmcore.engine.runtime.torch_device` and :func:`mmcore.export.runner.onnx_providers` place the model.
"""

from __future__ import annotations

import re

from mmcore.errors import MmcoreError

#: what ``--device`` accepts
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


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
