"""Hook specifications: one per component kind.

Every hook has the same shape: mmcore hands the plugin a ``register`` callable and the
plugin calls ``register(name, factory, params_cls)`` once per component it provides.
``docs/plugins.md`` documents each hook; a test fails when one is missing there.
"""

import pluggy

hookspec = pluggy.HookspecMarker("mmcore")
hookimpl = pluggy.HookimplMarker("mmcore")


@hookspec
def register_vision_encoders(register):
    """Call ``register(name, factory, params_cls)`` for each vision encoder.

    ``factory(params) -> mmcore.interfaces.VisionEncoder``.
    """


@hookspec
def register_text_encoders(register):
    """Call ``register(name, factory, params_cls)`` for each text encoder.

    ``factory(params) -> mmcore.interfaces.TextEncoder`` (or ``None`` for "no text").
    """


@hookspec
def register_poolings(register):
    """Call ``register(name, factory, params_cls)`` for each token pooling.

    ``factory(params, dim, has_cls_token) -> nn.Module``; ``module(tokens, mask) -> [B, dim]``.
    """


@hookspec
def register_fusions(register):
    """Call ``register(name, factory, params_cls)`` for each multimodal fusion.

    ``factory(params, vision_dim, text_dim) -> nn.Module`` with an ``out_dim`` attribute;
    ``module(vision, text) -> [B, out_dim]``.
    """


@hookspec
def register_heads(register):
    """Call ``register(name, factory, params_cls)`` for each classification head.

    ``factory(params, in_dim) -> nn.Module``; ``module(features) -> [B]`` logits.
    """


@hookspec
def register_losses(register):
    """Call ``register(name, factory, params_cls)`` for each loss.

    ``factory(params, label_counts) -> nn.Module``; ``module(logits, targets) -> scalar``.
    ``label_counts`` is ``(negatives, positives)`` in the training set.
    """


@hookspec
def register_schedulers(register):
    """Call ``register(name, factory, params_cls)`` for each learning-rate schedule.

    ``factory(params, optimizer, total_steps) -> torch.optim.lr_scheduler.LRScheduler``,
    stepped once per optimizer step.
    """


@hookspec
def register_augmentations(register):
    """Call ``register(name, factory, params_cls)`` for each image augmentation.

    ``factory(params) -> callable(PIL.Image) -> PIL.Image`` or ``None`` for no augmentation.
    Runs in data-loader workers, before the encoder's preprocessing.
    """


@hookspec
def register_ocr_engines(register):
    """Call ``register(name, factory, params_cls)`` for each OCR engine.

    ``factory(params) -> mmcore.interfaces.OcrEngine``.
    """
