"""The training step, in the shape of Lightning Fabric's loop.

One micro-batch: autocast forward, loss, ``backward(loss * weight)`` — under DDP's
``no_sync`` while the accumulation group is not complete, so gradients are all-reduced once
per optimizer step, not once per micro-batch. One optimizer step: clipping, optimizer and
scheduler step, zeroed gradients. Nothing here reads a value back to the host.
"""

from __future__ import annotations

import contextlib

import torch

from mmcore.dist import all_reduce_, world_size
from mmcore.engine.runtime import autocast, loss_scaler, to_device

#: cached vectors that arrive as float16 (half the bytes through the loader) and are upcast here;
#: cached token sequences stay float16 on the device: the pooling takes them as they are
#: (:class:`mmcore.interfaces.Pooling` says so), and the built-in attention casts them itself
HALF_FEATURES = ("vision_feature", "text_feature")


def prepare_batch(batch, device, channels_last=False):
    """The batch's tensors on ``device`` (non-blocking from pinned memory), pixels channels-last when asked.

    float16 cached vectors are upcast here, on the device; cached token sequences stay float16
    (with ``vision_mask`` None when they are all of one length), as the pooling contract says;
    uint8 pixels stay uint8 (the classifier normalises them,
    :func:`mmcore.model.classifier.device_pixels`), so the host only ever copies the small form.
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

    def __init__(self, model, optimizer, scheduler, loss_fn, *, device, dtype, grad_clip=0.0, channels_last=False, ema=None,
                 distill=None, online_teacher=None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        #: a DistillationLoss over ``loss_fn`` (``train.distill``): the batch then carries ``teacher_logit``
        self.distill = distill
        #: ``train.distill.online``: ``batch -> teacher logits`` (float32 [B]), scored as the batch arrives
        self.online_teacher = online_teacher
        self.device = device
        self.dtype = dtype
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        self.ema = ema  # a WeightEMA, updated after each optimizer step
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        #: fp16: a torch.amp.GradScaler; fp32/bf16: a pass-through (its state goes into last.ckpt)
        self.scaler = loss_scaler(dtype, device)
        self._synced = False  # did this group's gradients go through DDP's all-reduce?
        self._accumulated = False  # did any backward run in this group?

    def accumulating(self, sync):
        """DDP's ``no_sync`` unless ``sync`` (the group's last micro-batch); a no-op otherwise."""
        if sync or not is_ddp(self.model):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def loss(self, batch):
        """The float32 loss of one batch (forward under autocast), still on the device: the loss of
        the model's logit (with ``distill``, the distillation loss against the batch's teacher logits), plus ``weight * loss`` of each auxiliary logit its output carries."""
        if self.online_teacher is not None:
            batch["teacher_logit"] = self.online_teacher(batch)
        batch = prepare_batch(batch, self.device, self.channels_last)
        with autocast(self.device, self.dtype):
            out = self.model(batch)
        labels = batch["label"]
        if self.distill is None:
            loss = self.loss_fn(out.logit.float(), labels)
            labelled = None
        else:  # transfer rows carry no label (-1): the soft term only
            labelled = labels >= 0
            logit, teacher = out.logit.float().reshape(-1), batch["teacher_logit"]
            # a row the teacher could not read (NaN) gets the student's own logit: no soft term, no gradient from it
            teacher = torch.where(torch.isnan(teacher), logit.detach(), teacher)
            loss = self.distill(logit, teacher, labels, labelled).loss
        if out.aux is not None:
            loss = loss + out.aux.weight * sum(self._hard_loss(m.float(), labels, labelled) for m in out.aux.logits)
        return loss

    def _hard_loss(self, logits, labels, labelled):
        """The recipe's loss on the labelled rows (all rows when ``labelled`` is None; 0 when none is)."""
        if labelled is None:
            return self.loss_fn(logits, labels)
        logits, labels = logits.reshape(-1), labels.reshape(-1)
        return self.loss_fn(logits[labelled], labels[labelled]) if labelled.any() else logits.new_zeros(())

    def micro_step(self, batch, *, weight, sync, skip=None):
        """Forward and ``backward(loss * weight)`` of one batch.

        ``skip(loss) -> bool`` (the NaN policy) may veto the backward after the forward; it
        must answer the same on every rank. Returns ``(detached loss, backward ran)``.
        """
        with self.accumulating(sync):
            loss = self.loss(batch)
            if skip is not None and skip(loss):
                return loss.detach(), False
            self.scaler.scale(loss * weight).backward()
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
        # a group whose every batch was skipped has no gradient for the scaler to check
        scaling = self._accumulated
        if scaling:
            self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients
        if self.grad_clip > 0 and self.trainable:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        if scaling:
            self.scaler.step(self.optimizer)  # fp16: skipped when a gradient is inf/NaN (the scale halves)
            self.scaler.update()
        else:
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


def compiler_errors():
    """What torch.compile raises when it cannot compile: dynamo cannot trace the code, the
    backend fails (no C++ compiler, no Triton, a lowering it lacks) or does not exist. An
    out-of-memory error, or the model's own bug, is none of these."""
    import torch._dynamo.exc as dynamo
    import torch._inductor.exc as inductor

    return (
        dynamo.BackendCompilerFailed,  # inductor's InductorError, TritonMissing, ... derive from it
        dynamo.Unsupported,
        dynamo.InternalTorchDynamoError,
        dynamo.TorchRuntimeError,  # tracing with fake tensors failed (a real bug fails eagerly next)
        dynamo.InvalidBackend,
        inductor.CppCompileError,
        inductor.InvalidCxxCompiler,
        inductor.OperatorIssue,
    )


def _out_of_memory(exc):
    """Whether ``exc`` is, or was caused by, running out of device memory (compilers wrap what they hit)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        seen.add(id(exc))
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return False


def mark_variable_axes(batch, axes):
    """Mark the axes whose length changes from batch to batch (``Preprocessing.variable_axes``:
    NaFlex's patch axis) dynamic for torch.compile, so it compiles one graph for every length
    instead of recompiling until it guesses."""
    vision = batch.get("vision") if isinstance(batch, dict) else None
    for key, axis in axes:
        tensor = vision.get(key) if vision is not None else None
        if tensor is not None and tensor.dim() > axis:
            torch._dynamo.maybe_mark_dynamic(tensor, axis)


class GuardedCompile:
    """``torch.compile(target)`` called like ``eager``, falling back to ``eager`` on a compiler error.

    torch.compile fails lazily, at the first call (no C compiler, an op it cannot trace, an
    unsupported platform); then ``on_failure(message)`` is called once and every later call
    runs ``eager``. Only :func:`compiler_errors` fall back: an out-of-memory error or a bug in
    the model propagates. ``variable_axes`` are marked dynamic before each call.
    """

    def __init__(self, target, eager, *, on_failure, backend="inductor", variable_axes=()):
        self.eager = eager
        self.on_failure = on_failure
        self.variable_axes = tuple(variable_axes)
        try:
            self.compiled = torch.compile(target, backend=backend)
        except RuntimeError as exc:  # an unknown backend, a Python version dynamo does not support
            self.compiled = None
            self._fail(exc)

    def _fail(self, exc):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        self.on_failure(f"train.compile: torch.compile failed here ({type(exc).__name__}: {first}); training uncompiled")

    def __call__(self, batch, *args, **kwargs):
        if self.compiled is not None:
            mark_variable_axes(batch, self.variable_axes)
            try:
                return self.compiled(batch, *args, **kwargs)
            except compiler_errors() as exc:
                if _out_of_memory(exc):
                    raise
                self.compiled = None
                self._fail(exc)
        return self.eager(batch, *args, **kwargs)


class CompiledModel(torch.nn.Module):
    """``torch.compile`` of ``module`` with an eager fallback (``train.compile = true``), one process.

    ``backend`` is torch.compile's (``inductor``; ``aot_eager`` traces the same graphs without
    generating code); failures are :class:`GuardedCompile`'s. Parameters, buffers and
    train/eval mode are the module's own (``.module``, as DistributedDataParallel names it), so
    checkpoints never see the wrapper; evaluation and the feature cache run the module eagerly.
    Under DDP the DDP wrapper itself is compiled instead (:func:`compile_data_parallel`).
    """

    def __init__(self, module, on_failure, backend="inductor", variable_axes=()):
        super().__init__()
        self.module = module
        # not a submodule: no second copy in state_dict
        object.__setattr__(self, "guarded", GuardedCompile(
            module, module, on_failure=on_failure, backend=backend, variable_axes=variable_axes,
        ))

    def forward(self, batch):
        return self.guarded(batch)


def compile_data_parallel(ddp, *, on_failure, backend="inductor", variable_axes=()):
    """Compile a DistributedDataParallel module in place, as PyTorch documents for DDP: the wrapper,
    not the model inside it, so dynamo's DDP optimizer splits the graph at the gradient buckets
    and each bucket's all-reduce overlaps the rest of the backward. It stays the DDP object
    (``no_sync``, unwrapping); what ``nn.Module.compile`` would set is guarded by :class:`GuardedCompile`.
    """
    ddp._compiled_call_impl = GuardedCompile(
        ddp._call_impl, ddp._call_impl, on_failure=on_failure, backend=backend, variable_axes=variable_axes,
    )
    return ddp
