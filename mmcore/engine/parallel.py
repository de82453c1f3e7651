"""How a training run spreads over devices: the model DDP and torch.compile train, and each GPU's share of the batch.

``train.batch_size`` is the global batch (:func:`small_batch_warning` says when a GPU's share is
small); under DDP the DDP wrapper is compiled, buffers are synced only when training changes
them, and encoders moved off the GPU stay out of DDP (:func:`training_module`).
"""

from __future__ import annotations

import torch

from mmcore.store.root import warn
from mmcore.engine.loop import set_train_mode
from mmcore.engine.step import CompiledModel, compile_data_parallel


#: fewer samples per GPU than this leaves a GPU mostly idle: said when the global batch gives less
PER_GPU_BATCH_FLOOR = 16


def small_batch_warning(batch_size, world, device):
    """The line saying the global ``train.batch_size`` leaves each GPU a small batch, or None.

    ``train.batch_size`` is the global batch (a run on N GPUs optimizes the same batches as
    one process), so adding GPUs shrinks each one's share and the learning rate needs no
    change. To use more GPUs fully, raise the batch, and the learning rate with it (the linear
    scaling rule), which mmcore leaves to the recipe. Said on CUDA only, with several processes.
    """
    per_process = batch_size // world
    if world <= 1 or device.type != "cuda" or per_process >= PER_GPU_BATCH_FLOOR:
        return None
    suggested = PER_GPU_BATCH_FLOOR * world
    return (
        f"warning: train.batch_size = {batch_size} is the global batch: {per_process} per GPU on {world} GPUs, "
        f"which leaves each GPU mostly idle; for throughput raise it (e.g. {suggested} = {PER_GPU_BATCH_FLOOR} per GPU) "
        f"and scale train.learning_rate with it (linear scaling rule: x{suggested / batch_size:g}), which mmcore "
        "does not do for you (docs/distributed.md)"
    )


def batch_summary(batch_size, world, drop_last):
    """results.json's ``train_batch``: the effective global batch, each process's share, and the partial batch rule."""
    return {"global": batch_size, "per_process": batch_size // world, "processes": world, "drop_last": drop_last}


def compile_variable_axes(model, vision_cached):
    """The vision inputs' axes whose length varies between batches (NaFlex), for torch.compile."""
    if model.vision is None or vision_cached:
        return ()
    return model.vision.preprocessing.variable_axes


def buffers_change_in_training(model):
    """Whether training updates a buffer that DDP should keep equal across ranks: a batch norm
    that tracks running statistics and is in train mode once :func:`set_train_mode` ran (frozen
    encoders and batch norms whose statistics are frozen stay in eval mode)."""
    modes = {module: module.training for module in model.modules()}
    set_train_mode(model)
    try:
        return any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
            for m in model.modules()
        )
    finally:
        for module, mode in modes.items():
            module.training = mode


def _forward_buffer_sync(sync):
    """DDP's keyword for syncing buffers before every forward: ``forward_sync_buffers`` from torch
    2.14 (buffers are still synced once at start), ``broadcast_buffers`` before it."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    known = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers": sync}


def training_module(model, train, *, device, world, offloaded=(), variable_axes=()):
    """What the trainer calls: ``model``, compiled (``train.compile``) and/or in DDP (several processes).

    Under DDP the DDP wrapper is compiled, not the model inside it (PyTorch's documented order:
    dynamo's DDP optimizer then lets each gradient bucket's all-reduce overlap the backward);
    buffers are broadcast only when training changes them (:func:`buffers_change_in_training`);
    ``offloaded`` encoders (moved off the GPU, frozen, never in the forward) are left out of DDP.
    One process: :class:`CompiledModel` keeps evaluation and the feature cache eager.
    """
    backend = "inductor" if train.compile is True else train.compile

    def on_failure(line):
        warn(f"warning: {line}")

    if world > 1 and any(p.requires_grad for p in model.parameters()):
        from torch.nn.parallel import DistributedDataParallel

        ignored = [
            f"{name}.{key}" for name in offloaded
            for key, _ in (*getattr(model, name).named_parameters(), *getattr(model, name).named_buffers())
        ]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            **_forward_buffer_sync(buffers_change_in_training(model)),
        )
        if train.compile:
            compile_data_parallel(wrapped, on_failure=on_failure, backend=backend, variable_axes=variable_axes)
        return wrapped
    if train.compile:
        return CompiledModel(model, on_failure=on_failure, backend=backend, variable_axes=variable_axes)
    return model
