"""Which vision-encoder weights train, derived once from the encoder's declared blocks.

An encoder declares :meth:`~mmcore.interfaces.VisionEncoder.blocks` (input -> output),
:meth:`~mmcore.interfaces.VisionEncoder.final_norm` and ``lora_target_modules``; from those
this module derives every training mode, so no plugin writes freezing code:

=====================  ================  ==============================================
``finetune_layers``    ``freeze_backbone``  trainable encoder parameters
=====================  ================  ==============================================
``0``                  ``True``          none (the encoder is a frozen feature extractor)
``0``                  ``False``         all (the original treated this as "all layers")
``N > 0``              either            the last N blocks + the final norm
``-1``                 either            all
=====================  ================  ==============================================

An encoder with ``trainable = False`` (a fixed feature extractor: histograms, no parameters)
takes only the first row; any setting that asks it to learn is an error naming the key.

With ``lora.enabled`` the base weights are always frozen (``freeze_backbone`` is then
irrelevant) and peft LoRA adapters on the top ``lora.target_layers`` blocks are the only
trainable encoder parameters. LoRA together with ``finetune_layers != 0`` is an error: the
two answer the same question ("which part of the backbone learns?") differently, and
silently combining them would train a block both fully and through an adapter.

The adapters are injected in place (``peft.inject_adapter_in_model``), so the encoder stays
an instance of its own class with ``out_dim``, ``preprocessing`` and ``forward(**inputs)``
unchanged. The injected layers rename base weights (``q_proj.weight`` becomes
``q_proj.base_layer.weight``), so a checkpoint saved from ``model.state_dict()`` loads into
a model built from the same recipe *after* :func:`apply_trainability`.
"""

from __future__ import annotations

import attrs
from torch import nn

from mmcore.errors import RecipeError
from mmcore.validators import at_least, in_range, positive

#: substring peft puts in the names of LoRA parameters (lora_A, lora_B, lora_embedding_A, ...)
LORA_MARKER = "lora_"


class TrainabilityError(RecipeError, ValueError):
    """The training settings do not fit the encoder (e.g. more layers than it has)."""


@attrs.frozen(kw_only=True)
class LoraConfig:
    """The recipe's ``train.lora`` table."""

    enabled: bool = False
    rank: int = attrs.field(default=16, validator=positive)
    alpha: int = attrs.field(default=8, validator=positive)
    dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))
    #: LoRA on the top N blocks; -1 = all blocks
    target_layers: int = attrs.field(default=6, validator=at_least(1, allow=(-1,)))
    #: module-name suffixes to adapt; empty = the encoder's declared ``lora_target_modules``
    target_modules: tuple[str, ...] = ()


def apply_trainability(
    encoder, *, freeze_backbone: bool, finetune_layers: int, lora: LoraConfig
) -> nn.Module:
    """Set ``requires_grad`` on ``encoder`` (and inject LoRA adapters) in place; return it.

    See the module docstring for the rules. Raises :class:`TrainabilityError` when the
    settings do not fit the encoder.
    """
    if finetune_layers < -1:
        raise TrainabilityError(
            f"train.finetune_layers: must be >= 0 or -1 (got {finetune_layers})"
        )
    if any(LORA_MARKER in name for name, _ in encoder.named_parameters()):
        raise TrainabilityError(
            f"vision encoder {_label(encoder)} already has LoRA adapters; "
            "apply_trainability must run once, on a freshly built encoder"
        )
    if not encoder.trainable:
        problem = fixed_extractor_problem(
            _label(encoder), freeze_backbone=freeze_backbone, finetune_layers=finetune_layers, lora_enabled=lora.enabled
        )
        if problem:
            raise TrainabilityError(problem[1])
        return encoder
    if lora.enabled:
        if finetune_layers != 0:
            raise TrainabilityError(
                "train.finetune_layers: must be 0 when train.lora.enabled = true "
                f"(got {finetune_layers}); LoRA trains only its adapters, on the top "
                "train.lora.target_layers blocks"
            )
        return _inject_lora(encoder, lora)

    if finetune_layers == -1 or (finetune_layers == 0 and not freeze_backbone):
        encoder.requires_grad_(True)
        return encoder
    encoder.requires_grad_(False)
    if finetune_layers > 0:
        for block in _top_blocks(encoder, finetune_layers, key="train.finetune_layers"):
            block.requires_grad_(True)
        norm = encoder.final_norm()
        if norm is not None:
            norm.requires_grad_(True)
    return encoder


def fixed_extractor_problem(label, *, freeze_backbone, finetune_layers, lora_enabled):
    """``(key, line)`` when settings ask a fixed feature extractor (``trainable = False``) to learn, else None.

    Shared by :func:`apply_trainability` and the recipe's load-time check (which knows the
    encoder only by its params class), so both say the same line.
    """
    if lora_enabled:
        key, value = "train.lora.enabled", "true"
    elif finetune_layers != 0:
        key, value = "train.finetune_layers", str(finetune_layers)
    elif not freeze_backbone:
        key, value = "train.freeze_backbone", "false"
    else:
        return None
    return key, (
        f"{key}: vision encoder {label} is a fixed feature extractor with nothing to train "
        f"(got {value}); use freeze_backbone = true, finetune_layers = 0 and no LoRA"
    )


def lora_target_names(encoder, lora: LoraConfig) -> list[str]:
    """Qualified names of the modules LoRA wraps: targets under the top ``target_layers`` blocks."""
    suffixes = tuple(lora.target_modules or encoder.lora_target_modules)
    if not suffixes:
        raise TrainabilityError(
            f"train.lora.target_modules: vision encoder {_label(encoder)} declares no LoRA "
            "target modules; list module-name suffixes (e.g. [\"q_proj\", \"v_proj\"])"
        )
    count = len(encoder.blocks()) if lora.target_layers == -1 else lora.target_layers
    prefixes = encoder.block_prefixes()
    _check_layer_count(encoder, count, len(prefixes), key="train.lora.target_layers")
    top = tuple(prefix + "." for prefix in prefixes[len(prefixes) - count :])
    names = [
        name
        for name, _ in encoder.named_modules()
        if name.startswith(top) and any(name == s or name.endswith("." + s) for s in suffixes)
    ]
    if not names:
        raise TrainabilityError(
            f"train.lora.target_modules: none of {', '.join(suffixes)} is a module in the top "
            f"{count} blocks of vision encoder {_label(encoder)}"
        )
    return names


def _inject_lora(encoder, lora):
    import peft  # heavy; only LoRA runs need it

    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # exact qualified names: peft matches them verbatim, so only the top blocks get adapters
        target_modules=lora_target_names(encoder, lora),
        bias="none",
    )
    encoder.requires_grad_(False)
    # In place: returns the same object, unlike get_peft_model's PeftModel wrapper, which
    # would hide the encoder's attributes and change its forward signature.
    injected = peft.inject_adapter_in_model(config, encoder)
    assert injected is encoder
    # peft already marks only adapters trainable; make the contract explicit
    for name, param in encoder.named_parameters():
        param.requires_grad_(LORA_MARKER in name)
    return encoder


def _top_blocks(encoder, count, *, key):
    blocks = list(encoder.blocks())
    _check_layer_count(encoder, count, len(blocks), key=key)
    return blocks[len(blocks) - count :]


def _check_layer_count(encoder, count, available, *, key):
    if count > available:
        raise TrainabilityError(
            f"{key}: {count} is more than the {available} blocks of vision encoder "
            f"{_label(encoder)} (use -1 for all blocks)"
        )


def _label(encoder):
    return repr(getattr(encoder, "name", "") or type(encoder).__name__)


def is_frozen(module):
    """True when no parameter of ``module`` trains."""
    return module is not None and not any(p.requires_grad for p in module.parameters())


def unwrap(model):
    """The model inside its training wrappers, DistributedDataParallel and the compile wrapper
    (:class:`~mmcore.engine.step.CompiledModel`), which both hold it as ``.module``; the model
    itself when it is not wrapped. The one unwrapping rule of the engine and this module."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def block_depths(vision) -> dict[int, int]:
    """``id(param) -> depth`` for the vision encoder's parameters, from its declared blocks.

    The top (output) block is depth 0, the one below it 1, ...; the final norm sits with the
    top block; parameters in no block (patch/stem embeddings) are one below the lowest block,
    as in timm's and BEiT's layer-wise decay.
    """
    try:
        blocks = list(vision.blocks())
    except NotImplementedError:
        raise TrainabilityError(
            f"train.layer_decay: vision encoder {_label(vision)} declares no blocks(); use layer_decay = 1"
        ) from None
    n = len(blocks)
    depths = {id(p): n for p in vision.parameters()}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            depths[id(p)] = n - 1 - i
    norm = vision.final_norm()
    if norm is not None:
        for p in norm.parameters():
            depths[id(p)] = 0
    return depths


def parameter_groups(model, *, head_lr, backbone_lr, lora_lr, weight_decay, layer_decay=1.0) -> list[dict]:
    """AdamW parameter groups for the trainable parameters of ``model``.

    LoRA parameters (names containing ``lora_``) get ``lora_lr``, the other trainable
    parameters of ``model.vision`` get ``backbone_lr``, everything else (pooling, fusion,
    projection, head) ``head_lr``. Biases and norm weights (1-D tensors) get no weight decay
    and go into a separate group with the same ``name``. Each group carries ``name``
    (``head``, ``backbone`` or ``lora``) and ``decay`` (bool); empty groups are left out.

    With ``layer_decay < 1`` the encoder's groups are split by block depth (see
    :func:`block_depths`): depth d gets ``lr * layer_decay ** d`` and is named ``backbone.depthD``
    (``lora.depthD``), with ``depth`` in the group.
    """
    model = unwrap(model)
    vision = getattr(model, "vision", None)
    vision_ids = {id(p) for p in vision.parameters()} if vision is not None else set()
    trains = vision is not None and any(p.requires_grad for p in vision.parameters())
    depths = block_depths(vision) if trains and layer_decay != 1.0 else {}
    lrs = {"head": head_lr, "backbone": backbone_lr, "lora": lora_lr}
    buckets = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if LORA_MARKER in name:
            kind = "lora"
        elif id(param) in vision_ids:
            kind = "backbone"
        else:
            kind = "head"
        depth = depths.get(id(param)) if kind != "head" else None
        buckets.setdefault((kind, depth, param.ndim > 1), []).append(param)
    order = {"head": 0, "backbone": 1, "lora": 2}
    groups = []
    for (kind, depth, decay), params in sorted(buckets.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] or 0, not kv[0][2])):
        group = {
            "name": kind if depth is None else f"{kind}.depth{depth}",
            "params": params,
            "lr": lrs[kind] * (layer_decay**depth if depth is not None else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
            "decay": decay,
        }
        if depth is not None:
            group["depth"] = depth
        groups.append(group)
    return groups


def lora_state_dict(encoder) -> dict:
    """The LoRA adapter weights of ``encoder`` (keys as in ``encoder.state_dict()``).

    Enough to restore a LoRA run on top of the *same* base weights (a pretrained checkpoint).
    With a random base (``pretrained = false``) save the whole ``model.state_dict()``
    instead: the frozen base is part of what the run computed.
    """
    return {k: v.detach().clone() for k, v in encoder.state_dict().items() if LORA_MARKER in k}


def load_lora_state_dict(encoder, state: dict) -> None:
    """Load adapter weights saved by :func:`lora_state_dict` into a LoRA-applied encoder."""
    expected = {k for k in encoder.state_dict() if LORA_MARKER in k}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise TrainabilityError(
            "LoRA weights do not fit this encoder (was it built from the same recipe and "
            f"passed through apply_trainability?): missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    encoder.load_state_dict(state, strict=False)


def trainable_summary(model) -> dict:
    """``{child: {"trainable": n, "total": m}}`` per top-level child, plus ``"all"``."""
    model = unwrap(model)
    summary = {}
    for name, child in model.named_children():
        params = list(child.parameters())
        summary[name] = _count(params)
    summary["all"] = _count(list(model.parameters()))
    return summary


def _count(params):
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


#: set on an encoder by :func:`distributed_batchnorm` when its batch norms cannot be synchronised
FROZEN_BN_STATS = "mmcore_frozen_bn_stats"


def freeze_norm_statistics(encoder: nn.Module) -> None:
    """Put batch-norm layers whose affine weights are frozen into eval mode.

    Call it after every ``model.train()``: a frozen CNN block in train mode would still
    update its running mean/var, so "frozen" blocks would drift. Batch norms without affine
    weights are left alone (nothing says whether they belong to a frozen block). After
    :func:`distributed_batchnorm` froze the statistics of ``encoder``, every batch norm is
    put in eval mode.
    """
    frozen_stats = getattr(encoder, FROZEN_BN_STATS, False)
    for module in encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if frozen_stats or (params and not any(p.requires_grad for p in params)):
                module.eval()


def distributed_batchnorm(encoder: nn.Module, *, device, world_size: int) -> str:
    """Make the trainable batch norms of ``encoder`` right under DDP; returns what was done.

    Each rank only sees its slice of the global batch (32 on 8 ranks is 4 samples), so its
    own batch statistics are neither the single-process ones nor the other ranks'. On CUDA
    the batch norms become ``SyncBatchNorm`` (statistics over the global batch, through
    NCCL): ``"synced"``. Where that cannot run (CPU, gloo) the statistics are frozen
    instead: every batch norm normalises with its running statistics, which no longer
    change, while its affine weights still train: ``"frozen"``. ``"none"`` when nothing
    needed doing (one process, or no batch norm with trainable weights).
    """
    trainable = [
        m for m in encoder.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    if world_size <= 1 or not trainable:
        return "none"
    if device.type == "cuda":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
        assert converted is encoder  # the encoder itself is never a batch norm: converted in place
        return "synced"
    setattr(encoder, FROZEN_BN_STATS, True)
    freeze_norm_statistics(encoder)
    return "frozen"
