"""Device, precision, seeding and the (optional) distributed process group."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from mmcore.errors import MmcoreError


def resolve_device(name):
    """``auto`` -> this rank's CUDA device when present, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MmcoreError(f"train.device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MmcoreError(f"train.device: {name!r} requested but CUDA is not available here (use auto or cpu)")
    return device


def autocast_dtype(precision, device):
    """bf16 autocast on CUDA for ``auto``/``bf16``; none on CPU (fp32) unless bf16 is explicit."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


def init_distributed():
    """Join torchrun's process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or is_distributed():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend=backend)
    return True


def barrier():
    if is_distributed():
        torch.distributed.barrier()


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (identity without a process group)."""
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value):
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    if not is_distributed():
        return [value]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def any_rank(flag):
    """True when ``flag`` is True on any rank (keeps ranks in step, e.g. for a stop request)."""
    if not is_distributed():
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0])
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())
