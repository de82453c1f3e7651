"""Device, precision and seeding (the process group and its collectives: :mod:`mmcore.dist`).

Two ways to name a device: the recipe's ``train.device`` (:func:`resolve_device`, under torchrun the
local rank decides) and a scorer's ``--device auto|cpu|cuda[:N]`` (:mod:`mmcore.devices` reads it,
:func:`torch_device` makes it a torch device: ``predict``, ``eval``, ``serve`` and the scorers).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys

import numpy as np
import torch

from mmcore.devices import DeviceUnavailable, cuda_index, parse_device
from mmcore.dist import torchrun_local_rank
from mmcore.errors import MmcoreError


def resolve_device(name):
    """``auto`` -> this rank's CUDA device when present, else CPU; on the CPU, denormals flush to zero.

    Under torchrun the local rank decides the GPU (``cuda:LOCAL_RANK``): ``auto`` and ``cuda``
    mean it, and an explicit ``cuda:N`` that contradicts it is said in one line and replaced
    (every rank would otherwise share GPU N).
    """
    device = _parse_device(name)
    if device.type == "cpu":
        flush_denormals()
    return device


def flush_denormals():
    """Treat denormal floats as zero on the CPU (``torch.set_flush_denormal``); True where supported.

    As a model converges, gradients, Adam's second moments and small activations sink into the
    denormal range, where x86 arithmetic is many times slower: CPU epochs then slow down as
    training goes on (docs/performance.md, bench/denormals.py). Values that small change
    nothing a classifier computes. CUDA kernels flush by their own settings.
    """
    return torch.set_flush_denormal(True)


def _parse_device(name):
    local_rank = torchrun_local_rank()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MmcoreError(f"train.device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise MmcoreError(f"train.device: {name!r} requested but CUDA is not available here (use auto or cpu)")
    if local_rank is not None:
        if device.index is not None and device.index != local_rank:
            print(f"warning: train.device = {name!r} under torchrun: this process (LOCAL_RANK={local_rank}) uses "
                  f"cuda:{local_rank}, the GPU of its local rank (use \"auto\" or \"cuda\")", file=sys.stderr, flush=True)
        device = torch.device("cuda", local_rank)
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise MmcoreError(f"train.device: {name!r} requested but this machine has {count} CUDA device(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return device


def torch_device(spec):
    """The torch device for ``spec``; CUDA asked for where torch has none (or not that GPU) is one line."""
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


#: the compute capability from which a GPU has bfloat16 arithmetic (Ampere); older cards emulate it, slowly
BF16_CAPABILITY = (8, 0)

#: autocast dtype -> its ``train.precision`` name (results.json's ``precision``)
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def autocast_dtype(precision, device):
    """The autocast dtype of ``train.precision`` on ``device`` (None: fp32).

    ``auto`` on CUDA: bf16 where the card computes it natively (compute capability 8.0 and up:
    A100, H100, RTX 30xx/40xx), else fp16 with a gradient scaler (T4, V100: bf16 would be
    emulated and slow). ``auto`` on the CPU: fp32. ``bf16``/``fp16`` are taken as given.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= BF16_CAPABILITY else torch.float16
    return None


def precision_name(dtype):
    """``fp32``, ``bf16`` or ``fp16``: what a run computed in (results.json's ``precision``)."""
    return PRECISION_NAMES[dtype]


def describe_precision(precision, dtype, device):
    """One line saying what ``train.precision`` became on ``device`` and why (the run's log)."""
    name = precision_name(dtype)
    if device.type != "cuda":
        return f"precision: {name} on {device.type} (train.precision = {precision!r})"
    major, minor = torch.cuda.get_device_capability(device)
    card = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    scaler = " with a gradient scaler" if dtype == torch.float16 else ""
    why = ""
    if precision == "auto":
        why = ": bf16 native" if dtype == torch.bfloat16 else ": no native bf16 (needs 8.0)"
    return f"precision: {name} autocast{scaler} on {card}{why} (train.precision = {precision!r})"


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device``'s type; nothing when ``dtype`` is None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def exact_float32(device):
    """Inside: float32 matmuls and convolutions without TF32 on a GPU, whatever ``train.tf32`` set
    (what a bundle computes; scoring compares with it); nothing changes on a CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class NoScaling:
    """The loss scaler of fp32/bf16 training: every call passes through (bf16 has fp32's range)."""

    def is_enabled(self):
        return False

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def loss_scaler(dtype, device):
    """fp16 autocast: a ``torch.amp.GradScaler`` (fp16 gradients underflow without it); else :class:`NoScaling`.

    The scaler has the step's shape: ``scale(loss).backward()``, ``unscale_`` before clipping,
    ``step`` (skipped when a gradient is inf/NaN, the scale then halves), ``update``.
    """
    if dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return NoScaling()


def seed_everything(seed, deterministic=False):
    """Seed python, numpy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def to_device(batch, device):
    """Move every tensor of a (nested) batch dict to ``device`` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def release_memory():
    """Between the runs of one process (sweep points, trials): collect garbage, empty CUDA's cache."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
