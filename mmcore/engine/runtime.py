"""Device, precision, seeding and the (optional) distributed process group."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import random
import sys

import numpy as np
import torch

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


def torchrun_local_rank():
    """This process's ``LOCAL_RANK`` when torchrun started it, else None."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["LOCAL_RANK"])
    except ValueError:
        return None


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
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


# ---------------------------------------------------------------- distributed


def world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank():
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main():
    return rank() == 0


def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


#: ``train.dist_timeout_s``'s default: how long a collective may wait for the slowest rank (30 min;
#: NCCL's own default is 10 min, too short for a rank finishing a long share of a cache fill)
DEFAULT_DIST_TIMEOUT_S = 1800


def init_distributed(timeout_s=DEFAULT_DIST_TIMEOUT_S):
    """Join torchrun's process group when launched by torchrun.

    On CUDA the group has two backends, ``cpu:gloo,cuda:nccl``, bound to this rank's device
    (``device_id``): CUDA tensors go through NCCL, and small host-side flags (a stop request)
    through gloo without waiting on the GPU. On CPU it is gloo alone. ``timeout_s`` is the
    group's explicit timeout (``train.dist_timeout_s``): a collective one rank waits at
    longer than that fails instead of hanging.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or is_distributed():
        return False
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="cpu:gloo,cuda:nccl", device_id=device, timeout=timeout)
    else:
        torch.distributed.init_process_group(backend="gloo", timeout=timeout)
    return True


def shutdown_distributed():
    """Leave the process group (what :func:`init_distributed` joined), if any.

    A process that exits with its gloo group still up can abort in the group's destructor
    ("terminate called without an active exception", exit -6) after finishing its work:
    torchrun then reports the rank failed.
    """
    if is_distributed():
        gc.collect()  # garbage that still holds the group (a DDP wrapper in a cycle) goes first
        torch.distributed.destroy_process_group()


def local_world_size():
    """Processes on this machine under torchrun (``LOCAL_WORLD_SIZE``); 1 otherwise."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        return 1


#: device types each process-group backend can run collectives on (NCCL: CUDA only)
BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "mpi": ("cpu", "cuda"), "ucc": ("cpu", "cuda")}


def backend_name():
    """The process group's backend string, e.g. ``gloo``, ``nccl`` or ``cpu:gloo,cuda:nccl``."""
    return str(torch.distributed.get_backend())


def backend_devices(backend=None):
    """Device types the backend can run collectives on (``cpu:gloo,cuda:nccl`` -> cpu and cuda)."""
    backend = backend_name() if backend is None else backend
    if ":" in backend:
        return tuple(part.split(":", 1)[0] for part in backend.split(","))
    return BACKEND_DEVICES.get(backend, ("cpu",))


def collective_device(prefer=None):
    """Where a tensor handed to a collective must live: ``prefer``'s device when the backend
    supports it, else the CPU when it does, else the current CUDA device (NCCL alone)."""
    devices = backend_devices()
    if prefer is not None and torch.device(prefer).type in devices:
        return torch.device(prefer)
    if "cpu" in devices:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def barrier():
    if is_distributed():
        torch.distributed.barrier()


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (identity without a process group)."""
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]


def all_gather_objects(value):
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    if not is_distributed():
        return [value]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _object_device():
    """Object collectives pickle into a byte tensor: put it where the backend runs."""
    return collective_device()


def any_rank(flag):
    """True when ``flag`` is True on any rank (keeps ranks in step, e.g. for a stop request).

    ``flag`` is a Python bool or a tensor; a tensor stays on its device when the backend
    supports it, so a CUDA flag under ``cpu:gloo,cuda:nccl`` goes through NCCL, a host flag
    through gloo. Reading the answer waits for the flag's device: call it where a host
    decision is needed anyway.
    """
    if not is_distributed():
        return bool(flag)
    if isinstance(flag, torch.Tensor):
        device = collective_device(flag.device)
        tensor = flag.detach().reshape(1).to(device=device, dtype=torch.int32)
    else:
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def all_reduce_(tensor, op="sum"):
    """In-place all-reduce of ``tensor`` (``sum``, ``min`` or ``max``) on a device the backend
    supports; a no-op without a process group. Returns ``tensor``."""
    if not is_distributed():
        return tensor
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
           "max": torch.distributed.ReduceOp.MAX}
    work = _collective_copy(tensor)
    torch.distributed.all_reduce(work, op=ops[op])
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def _collective_copy(tensor):
    """``tensor`` itself when a collective can take it (its device supported, contiguous), else a copy that can."""
    device = collective_device(tensor.device)
    if tensor.device == device and tensor.is_contiguous():
        return tensor
    return tensor.to(device).contiguous()


def broadcast_tensors_(tensors, src=0):
    """Rank ``src``'s values into ``tensors`` in place, on every rank (no-op alone)."""
    if not is_distributed():
        return tensors
    for tensor in tensors:
        work = _collective_copy(tensor)
        torch.distributed.broadcast(work, src=src)
        if work is not tensor:
            tensor.copy_(work)
    return tensors


def release_memory():
    """Between the runs of one process (sweep points, trials): collect garbage, empty CUDA's cache."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
