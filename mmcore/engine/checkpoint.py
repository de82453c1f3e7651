"""Checkpoints: tensors and plain types only, always read with ``weights_only=True``.

A checkpoint holds what is needed to rebuild the trained model from its recipe: the head,
pooling and fusion, the trained encoder weights (top-N blocks) or LoRA adapters, and the
whole encoder when it was built with random weights (its weights are then part of the run).
Frozen pretrained encoder weights are not copied: they are reloaded from their id.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mmcore import __version__
from mmcore.errors import RunError
from mmcore.io import save_torch

FORMAT = "mmcore.checkpoint"
FORMAT_VERSION = 1


def _encoder_dropped_keys(model):
    """State keys of frozen pretrained encoders (reloaded from their id, not saved)."""
    dropped = set()
    for prefix in ("vision", "text"):
        encoder = getattr(model, prefix, None)
        if encoder is None or getattr(encoder, "weights", "random") == "random":
            continue
        params = dict(encoder.named_parameters())
        trains = any(p.requires_grad for p in params.values())
        fitted = set(encoder.fitted_state_keys()) if hasattr(encoder, "fitted_state_keys") else set()
        for key in encoder.state_dict():
            if key in fitted:
                continue  # fitted on this run's training split: only the checkpoint has it
            param = params.get(key)
            if param is not None and param.requires_grad:
                continue
            if param is None and trains:
                continue  # buffers (batch-norm statistics) of a partly trained encoder
            dropped.add(f"{prefix}.{key}")
    return dropped


def model_state_keys(model):
    """The keys of ``model.state_dict()`` a checkpoint carries (see :func:`model_state`)."""
    dropped = _encoder_dropped_keys(model)
    return [key for key in model.state_dict() if key not in dropped]


def model_state(model):
    """The part of ``model.state_dict()`` a checkpoint must carry (detached CPU tensors)."""
    dropped = _encoder_dropped_keys(model)
    return {
        key: value.detach().to("cpu").clone()
        for key, value in model.state_dict().items()
        if key not in dropped
    }


def make_checkpoint(model, *, recipe_dict, epoch, metrics, extra=None):
    """A plain dict with the model state and everything needed to trust it later."""
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mmcore_version": __version__,
        "recipe": recipe_dict,
        "encoders": {
            prefix: getattr(getattr(model, prefix), "identity", None)
            for prefix in ("vision", "text")
            if getattr(model, prefix, None) is not None
        },
        "epoch": epoch,
        "metrics": metrics,
        "model": model_state(model),
    }
    ckpt.update(extra or {})
    return ckpt


def save_checkpoint(path, ckpt):
    return save_torch(path, ckpt)


def read_checkpoint(path):
    """Load with ``weights_only=True``; a foreign or newer file fails with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(
            f"{path}: not a loadable mmcore checkpoint ({_refusal(exc)}); only tensors and plain "
            f"types are accepted"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RunError(f"{path}: not an mmcore checkpoint (no '{FORMAT}' format marker)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise RunError(
            f"{path}: checkpoint format {ckpt['format_version']} is newer than this mmcore "
            f"({__version__}, format {FORMAT_VERSION}); upgrade mmcore"
        )
    return ckpt


_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)|Unsupported operand (\d+)|unsupported class ([\w.]+)", re.I)


def _refusal(exc):
    """What torch's safe loader refused and why, in our words.

    torch's own message advises re-running with ``weights_only=False``, i.e. letting the file
    run code; that advice is never passed on.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = _GLOBAL.search(text)
    if match and match.group(2):
        return f"its pickle data uses operation {match.group(2)}, which the safe loader does not allow: refused"
    if match:
        what = match.group(1) or match.group(3)
        return f"it refers to {what}, which is code, not data: refused without running it"
    if "weights_only" in text or "WeightsUnpickler" in text:
        return "it holds objects other than tensors and plain types: refused without running them"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return " ".join(first.split())[:200]


def load_model_state(model, ckpt, *, path="checkpoint"):
    """Load a checkpoint's state into a model built from its recipe, explaining any mismatch."""
    state = ckpt["model"]
    own = model.state_dict()
    dropped = _encoder_dropped_keys(model)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - dropped)
    shape = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if unexpected or missing or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(
                f"{len(shape)} tensors differ in shape (e.g. {k}: {tuple(state[k].shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the model)"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise RunError(
            f"{path}: checkpoint does not fit the model built from this recipe: "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)
    for prefix, identity in ckpt.get("encoders", {}).items():
        encoder = getattr(model, prefix, None)
        if encoder is not None and identity and encoder.identity != identity:
            raise RunError(
                f"{path}: the {prefix} encoder differs from the one the checkpoint was trained "
                f"with ({encoder.identity} vs {identity})"
            )
