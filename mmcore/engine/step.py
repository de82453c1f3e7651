"""The training step, in the shape of Lightning Fabric's loop.

One micro-batch: autocast forward, loss, ``backward(loss * weight)`` — under DDP's
``no_sync`` while the accumulation group is not complete, so gradients are all-reduced once
per optimizer step, not once per micro-batch. One optimizer step: clipping, optimizer and
scheduler step, zeroed gradients. Nothing here reads a value back to the host.
"""

from __future__ import annotations

import contextlib

import torch

from mmcore.engine.runtime import all_reduce_, autocast, to_device, world_size

#: cached vectors that arrive as float16 (half the bytes through the loader) and are upcast here;
#: cached token sequences stay float16 on the device: the pooling takes them as they are
#: (:class:`mmcore.interfaces.Pooling` says so), and the built-in attention casts them itself
HALF_FEATURES = ("vision_feature", "text_feature")


def prepare_batch(batch, device, channels_last=False):
    """The batch's tensors on ``device`` (non-blocking from pinned memory), pixels channels-last when asked.

    float16 cached vectors are upcast here, on the device; cached token sequences stay float16
    (with ``vision_mask`` None when they are all of one length), as the pooling contract says;
    uint8 pixels stay uint8 (the classifier normalises them,
    :func:`mmcore.data.dataset.device_pixels`), so the host only ever copies the small form.
    """
    batch = to_device(batch, device)
    vision = batch.get("vision")
    for key in HALF_FEATURES:
        if batch.get(key) is not None and batch[key].dtype == torch.float16:
            batch[key] = batch[key].float()
    if channels_last and vision is not None and vision["pixel_values"].dim() == 4:
        vision["pixel_values"] = vision["pixel_values"].contiguous(memory_format=torch.channels_last)
    return batch


def group_lrs(optimizer):
    """One learning rate per named parameter group (head, backbone, lora)."""
    return {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}


def is_ddp(model):
    """Whether ``model`` is wrapped in DistributedDataParallel."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


class TrainStep:
    """``micro_step`` per batch, ``optimizer_step`` per accumulation group.

    ``model`` may be wrapped in DistributedDataParallel; the step then runs the forward and
    backward of every micro-batch but the group's last under ``no_sync``. When the group's
    last backward did not run (the batch was skipped on every rank), the gradients are
    all-reduced by hand before the optimizer step, so ranks never drift apart.
    """

    def __init__(self, model, optimizer, scheduler, loss_fn, *, device, dtype, grad_clip=0.0, channels_last=False, ema=None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.device = device
        self.dtype = dtype
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        self.ema = ema  # a WeightEMA, updated after each optimizer step
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self._synced = False  # did this group's gradients go through DDP's all-reduce?
        self._accumulated = False  # did any backward run in this group?

    def accumulating(self, sync):
        """DDP's ``no_sync`` unless ``sync`` (the group's last micro-batch); a no-op otherwise."""
        if sync or not is_ddp(self.model):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def loss(self, batch):
        """The float32 loss of one batch (forward under autocast), still on the device: the loss of
        the model's logit, plus ``weight * loss`` of each auxiliary logit its output carries."""
        batch = prepare_batch(batch, self.device, self.channels_last)
        with autocast(self.device, self.dtype):
            out = self.model(batch)
        loss = self.loss_fn(out.logit.float(), batch["label"])
        if out.aux is not None:
            loss = loss + out.aux.weight * sum(self.loss_fn(m.float(), batch["label"]) for m in out.aux.logits)
        return loss

    def micro_step(self, batch, *, weight, sync, skip=None):
        """Forward and ``backward(loss * weight)`` of one batch.

        ``skip(loss) -> bool`` (the NaN policy) may veto the backward after the forward; it
        must answer the same on every rank. Returns ``(detached loss, backward ran)``.
        """
        with self.accumulating(sync):
            loss = self.loss(batch)
            if skip is not None and skip(loss):
                return loss.detach(), False
            (loss * weight).backward()
        self._accumulated = True
        self._synced = self._synced or sync
        return loss.detach(), True

    def optimizer_step(self):
        """Clip, optimizer step, EMA update, scheduler step, zero grads; returns ``(lrs used, grad norm or None)``.

        The learning rates are those the optimizer step used (read before the scheduler
        moves them on); the gradient norm stays a device tensor.
        """
        if is_ddp(self.model) and self._accumulated and not self._synced:
            self._all_reduce_gradients()
        lrs = group_lrs(self.optimizer)
        norm = None
        if self.grad_clip > 0 and self.trainable:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._synced = self._accumulated = False
        return lrs, norm

    def _all_reduce_gradients(self):
        """What DDP's backward would have done: average the gradients over the ranks."""
        world = world_size()
        for param in self.trainable:
            if param.grad is not None:
                all_reduce_(param.grad, "sum").div_(world)


class CompiledModel(torch.nn.Module):
    """``torch.compile`` of ``module`` with an eager fallback (``train.compile = true``).

    ``backend`` is torch.compile's (``inductor``; ``aot_eager`` traces the same graphs without
    generating code). torch.compile fails lazily, at the first call (no C compiler, an op it cannot trace, an
    unsupported platform); then ``on_failure(message)`` is called once and every later call
    runs the eager module. Parameters, buffers and train/eval mode are the module's own
    (``.module``, as DistributedDataParallel names it), so checkpoints never see the wrapper.
    """

    def __init__(self, module, on_failure, backend="inductor"):
        super().__init__()
        self.module = module
        self.on_failure = on_failure
        try:
            compiled = torch.compile(module, backend=backend)
        except Exception as exc:  # e.g. a Python version dynamo does not support
            compiled = None
            self._fail(exc)
        object.__setattr__(self, "compiled", compiled)  # not a submodule: no second copy in state_dict

    def _fail(self, exc):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        self.on_failure(f"train.compile: torch.compile failed here ({type(exc).__name__}: {first}); training uncompiled")

    def forward(self, batch):
        if self.compiled is not None:
            try:
                return self.compiled(batch)
            except Exception as exc:
                object.__setattr__(self, "compiled", None)
                self._fail(exc)
        return self.module(batch)
