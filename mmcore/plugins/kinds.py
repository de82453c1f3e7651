"""The one list of component kinds: the hooks, the registry, recipes, docs and tests derive from it.

Adding a kind is one row here (plus its built-ins and a ``check_<kind>`` in :mod:`mmcore.testing`):
:mod:`mmcore.plugins.hookspecs` makes its hookspec from the row, the registry keeps a table for
it, the recipe schema knows which tables are components, and the docs test asks for a section.
"""

from __future__ import annotations

from typing import NamedTuple

from mmcore.plugins.traits import AugmentationTraits, VisionTraits


class Kind(NamedTuple):
    """One kind of component."""

    #: the registry kind, and the recipe table when ``in_recipe``
    name: str
    #: the hook a plugin implements
    hook: str
    #: what messages call it ("vision encoder")
    human: str
    #: the factory contract, as the hookspec's docstring and docs/plugins.md state it
    contract: str
    #: a ``[name]`` table of recipes (OCR engines are named in ``data.ocr.engine`` instead)
    in_recipe: bool = True
    #: what ``register(..., traits=...)`` takes for this kind (:mod:`mmcore.plugins.traits`), or None
    traits: type | None = None


KIND_TABLE = (
    Kind("vision", "register_vision_encoders", "vision encoder",
         "``factory(params) -> mmcore.VisionEncoder``.", traits=VisionTraits),
    Kind("text", "register_text_encoders", "text encoder",
         '``factory(params) -> mmcore.TextEncoder`` (or ``None`` for "no text").'),
    Kind("pooling", "register_poolings", "pooling",
         "``factory(params, dim, has_cls_token) -> mmcore.Pooling``; ``module(tokens, mask) -> [B, dim]``,\n"
         "``mask`` None when every token is real; ``tokens`` may be float16."),
    Kind("fusion", "register_fusions", "fusion",
         "``factory(params, vision_dim, text_dim) -> mmcore.Fusion`` with an ``out_dim`` attribute;\n"
         "``module(vision, text) -> mmcore.FusionOutput(fused [B, out_dim], aux_logits, gate)``."),
    Kind("head", "register_heads", "head",
         "``factory(params, in_dim) -> mmcore.Head``; ``module(features) -> [B]`` logits."),
    Kind("loss", "register_losses", "loss",
         "``factory(params, label_counts) -> nn.Module``; ``module(logits, targets) -> scalar``.\n"
         "``label_counts`` is ``(negatives, positives)`` in the training set."),
    Kind("scheduler", "register_schedulers", "scheduler",
         "``factory(params, optimizer, total_steps) -> torch.optim.lr_scheduler.LRScheduler``,\n"
         "stepped once per optimizer step."),
    Kind("augmentation", "register_augmentations", "augmentation",
         "``factory(params) -> callable(PIL.Image) -> PIL.Image`` or ``None`` for no augmentation.\n"
         "Runs in data-loader workers, before the encoder's preprocessing.", traits=AugmentationTraits),
    Kind("ocr", "register_ocr_engines", "OCR engine",
         "``factory(params) -> mmcore.OcrEngine``.", in_recipe=False),
)

#: kind name -> :class:`Kind`
KINDS = {kind.name: kind for kind in KIND_TABLE}
