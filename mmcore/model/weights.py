"""The pretrained weights a recipe's model will load, found before it is built or any data is read.

Each encoder the recipe's modality uses says what it loads (``register(..., weights=fn)``, see
:mod:`mmcore.kit.weights`); :func:`require_weights` looks every one up (:mod:`mmcore.kit.hub`:
a local path, the Hugging Face or torch hub cache, else a download when the server answers)
and refuses the recipe in one message that names every missing model and how to get it.
An encoder whose plugin declares nothing is not checked here; its factory's own load error stays.
"""

from __future__ import annotations

import attrs

from mmcore.errors import RecipeError
from mmcore.interfaces import NoWeightsParams
from mmcore.kit.hub import hub_online, offline_by_env, resolve_weights
from mmcore.kit.weights import PartRef
from mmcore.plugins.kinds import KINDS
from mmcore.plugins.registry import UnknownComponentError
from mmcore.recipe.convert import structure

#: how a message names where a ref comes from
SOURCE_LABELS = {"huggingface": "Hugging Face hub", "torchvision": "torchvision", "timm": "timm", "local": "local path"}
#: how ``mmcore show --weights`` says where a resolved ref is
STATE_LABELS = {"local": "local", "cached": "cached", "download": "to download from", "missing": "MISSING:"}


class MissingWeightsError(RecipeError):
    """Pretrained weights the recipe needs are neither on this machine nor downloadable (exit 2)."""


@attrs.frozen
class Needed:
    """One :class:`~mmcore.kit.weights.WeightRef`, with the recipe key path of the component that loads it."""

    key: str
    component: str
    ref: object


@attrs.frozen
class WeightsReport:
    """Every declared weight of a recipe, resolved; ``undeclared``: the key paths of encoders that declare nothing."""

    resolved: list
    undeclared: list

    @property
    def missing(self):
        return [(needed, found) for needed, found in self.resolved if found.missing]

    def lines(self):
        """One line per weight (and per encoder that declares nothing), for ``mmcore show --weights``."""
        lines = []
        for needed, found in self.resolved:
            where = found.problem if found.missing else found.path or found.server
            lines.append(f"{needed.key} ({needed.component}): {_describe(needed.ref)}: {STATE_LABELS[found.state]} {where}")
        lines.extend(f"{key}: its plugin declares no weights: checked when it is built" for key in self.undeclared)
        return lines or ["no pretrained weights needed"]


def needed_weights(recipe, registry, *, source="recipe"):
    """``(needed, undeclared)``: what each encoder of the recipe's modality declares it loads."""
    modality = recipe.train.modality
    components = []
    if modality != "text_only":
        components.append(("vision", recipe.vision))
    if modality != "vision_only":
        components.append(("text", recipe.text))
    needed, undeclared = [], []
    for key, component in components:
        _collect(registry, key, key, component.name, component.params, source, needed, undeclared)
    return needed, undeclared


def _collect(registry, kind, key, name, params, source, needed, undeclared):
    """Add what ``name`` at recipe key ``key`` declares; a :class:`PartRef` adds its part's declaration."""
    registration = registry.get(kind, name)
    if registration.weights is None:
        if not issubclass(registration.params_cls, NoWeightsParams):  # those say they load nothing
            undeclared.append(f"{key} ({KINDS[kind].human} {name!r})")
        return
    for item in registration.weights(params):
        if not isinstance(item, PartRef):
            needed.append(Needed(key=key, component=f"{KINDS[kind].human} {name!r}", ref=item))
            continue
        part_key = f"{key}.{item.key}"
        try:
            part = registry.get(item.kind, item.name)
        except UnknownComponentError as exc:
            raise RecipeError(f"{source}: {part_key}.name: {exc}") from None
        structured = structure(item.params, part.params_cls, source=source, path=f"{part_key}.params")
        _collect(registry, item.kind, part_key, item.name, structured, source, needed, undeclared)


def weights_report(recipe, registry, *, source="recipe"):
    """Every weight the recipe's encoders declare, looked up on this machine (one network probe at most).

    An encoder that declares nothing may still read the Hugging Face hub when it is built: the hub
    is probed for it too, so that without network its libraries read only their cache, at once.
    """
    needed, undeclared = needed_weights(recipe, registry, source=source)
    if undeclared:
        hub_online()
    found = resolve_weights([item.ref for item in needed])
    return WeightsReport(resolved=list(zip(needed, found)), undeclared=undeclared)


def require_weights(recipe, registry, *, source="recipe"):
    """The :class:`WeightsReport`; a :class:`MissingWeightsError` naming every missing model when any is."""
    report = weights_report(recipe, registry, source=source)
    if report.missing:
        raise MissingWeightsError(missing_weights_lines(report.missing, source))
    return report


def missing_weights_lines(missing, source):
    """The message: what is missing and why, one line per model with its download command, then the fixes."""
    count = len(missing)
    head = f"{source}: {count} pretrained {'model is' if count == 1 else 'models are'} not on this machine"
    servers = sorted({found.server for _, found in missing if found.server})
    if servers and offline_by_env():
        head += " and cannot be downloaded: offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    elif servers:
        head += f" and cannot be downloaded: no network ({', '.join(servers)} did not answer)"
    lines = [head]
    for needed, found in missing:
        line = f"{source}: {needed.key}: {needed.component} needs {_describe(needed.ref)}: {found.problem}"
        lines.append(line + (f"; download it: {found.fetch}" if found.fetch else ""))
    keys = list(dict.fromkeys(needed.key for needed, _ in missing))
    weights = " or ".join(f'{key}.params.weights = "/path/to/weights"' for key in keys)
    random = " or ".join(f"{key}.params.pretrained = false" for key in keys)
    lines.append(
        f"{source}: to fix: download where there is network (the commands above) and copy the cache "
        f"(HF_HOME, TORCH_HOME) here, or set {weights} (a local copy), or {random} (random weights)"
    )
    return lines


def _describe(ref):
    revision = f"@{ref.revision}" if ref.revision else ""
    return f"{ref.id}{revision} ({SOURCE_LABELS[ref.source]})"
