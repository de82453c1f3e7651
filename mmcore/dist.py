"""The (optional) distributed process group and every collective: the bottom layer's one door to
``torch.distributed``.

torchrun starts the processes; :func:`init_distributed` joins its group. Without a group every
function here is the one-process identity (``world_size() == 1``, ``all_gather_objects(v) == [v]``),
so callers need no special case. Each tensor handed to a collective is put where the backend
runs it (:func:`collective_device`). Devices, precision and seeding are :mod:`mmcore.engine.runtime`'s.
"""

from __future__ import annotations

import datetime
import gc
import os

import torch


def torchrun_local_rank():
    """This process's ``LOCAL_RANK`` when torchrun started it, else None."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["LOCAL_RANK"])
    except ValueError:
        return None



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
