"""Pretrained weights: what a component declares it will load, and loading with an error a user can act on.

The declared protocol: a plugin registers an encoder with ``weights=``, a function of the
encoder's structured params that returns what the factory would load, without loading it::

    register("resnet50", build_resnet50, ResNetParams,
             weights=lambda params: torchvision_weights(params, "ResNet50_Weights.IMAGENET1K_V2"))

It returns a list of :class:`WeightRef` (one set of weights: a Hugging Face repo, torchvision
weights, a timm model, a local path) and, for a component built from other registered
components (``concat``), :class:`PartRef` (the part's own declaration counts). An empty list
means random weights; a component registered without ``weights=`` is not checked before it
is built. :func:`hub_weights`, :func:`torchvision_weights` and :func:`timm_weights` are the
declarations of the kit's builders; :mod:`mmcore.kit.hub` finds each ref on this machine.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from mmcore.errors import MmcoreError

#: what a failed download tells the user to do
WEIGHTS_HINT = (
    "; download them where you have network and set params.weights to that local directory, "
    "or set params.pretrained = false for random weights"
)
#: suffixes that make ``params.weights`` a file name rather than a hub or library id
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")

#: where a :class:`WeightRef` comes from: a Hugging Face hub repo, torchvision's weights enum,
#: a timm model name (its pretrained tag says which weights), a local file or directory
SOURCES = ("huggingface", "torchvision", "timm", "local")


class WeightsError(MmcoreError):
    """Pretrained weights could not be loaded."""


@attrs.frozen(kw_only=True)
class WeightRef:
    """One set of pretrained weights a component will load.

    ``id``: the repo id (``google/siglip2-base-patch16-224``), the torchvision weights name
    (``ResNet50_Weights.IMAGENET1K_V2``), the timm model name with its tag
    (``vit_base_patch16_224.augreg2_in21k_ft_in1k``, or ``hf-hub:org/name``), or the path.
    ``revision``: a hub branch, tag or commit (None: ``main``). ``files``: for a hub repo, the
    files the component reads when it is not a whole model (a config alone); None means a model:
    ``config.json`` and its weights.
    """

    source: str = attrs.field(validator=attrs.validators.in_(SOURCES))
    id: str
    revision: str | None = None
    files: tuple[str, ...] | None = None


@attrs.frozen(kw_only=True)
class PartRef:
    """A part a composite component builds through the registry: the part's own ``weights`` count.

    ``params``: the part's params as written in the recipe (a dict); ``key``: where they sit
    under the composite's key path (``params.encoders[1]``), for messages.
    """

    kind: str
    name: str
    params: dict
    key: str


def is_local_path(weights, *, hub_ids=False):
    """True when ``weights`` names a file or directory rather than a hub or library id.

    torchvision and timm ids never hold a ``/`` (timm's ``hf-hub:org/name`` aside), so there
    any ``/`` means a path. With ``hub_ids`` (Hugging Face repos) ``org/name`` is an id unless
    it exists on disk; a path starts with ``/``, ``~`` or ``.``, or has more than one ``/``.
    """
    weights = str(weights)
    if weights.startswith("hf-hub:"):
        return False
    path = Path(weights).expanduser()
    if weights.startswith(("/", "~", ".")) or "\\" in weights or path.suffix in WEIGHT_FILE_SUFFIXES or path.exists():
        return True
    return weights.count("/") > 1 if hub_ids else "/" in weights


def local_weights_hint(path):
    """What a local weights path that failed to load tells the user: the path that was tried."""
    tried = Path(path).expanduser().resolve()
    return (
        f"; the path tried was {tried}: set params.weights to a weights file or a folder holding one, "
        "or set params.pretrained = false for random weights"
    )


def load_pretrained(loader, model_id, *, component, **kwargs):
    """``loader(model_id, **kwargs)``, turning a failed load into one actionable line.

    A hub id that fails says how to work offline; a local path says which path was tried.
    Before a hub id loads, the network is probed once per process (:func:`mmcore.kit.hub.hub_online`):
    without it, Hugging Face libraries read only their cache instead of retrying for a minute.
    """
    from mmcore.kit.hub import hub_online

    local = is_local_path(model_id, hub_ids=True)
    if not local:
        hub_online()
    try:
        return loader(model_id, **kwargs)
    except Exception as exc:  # network, missing files, auth: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = local_weights_hint(model_id) if local else WEIGHTS_HINT
        raise WeightsError(f"{component}: could not load weights {model_id!r} ({reason[:160]}){hint}") from exc


# --- the declarations of the kit's builders -----------------------------------------------


def hub_weights(params, default_id, *, files=None):
    """What a Hugging Face model built from ``params`` loads: ``params.weights`` (a repo id or a
    local directory), else ``default_id``; nothing for random builds (``tiny``, ``pretrained = false``)."""
    if params.tiny or not params.pretrained:
        return []
    weights = str(params.weights or default_id)
    if is_local_path(weights, hub_ids=True):
        return [WeightRef(source="local", id=weights)]
    return [WeightRef(source="huggingface", id=weights, revision=params.revision, files=files)]


def library_weights_source(params, default_id):
    """``("local", path)``, ``("hub", id)`` or ``("random", None)`` for a torchvision or timm encoder.

    A local ``weights`` path always loads (into the tiny architecture too, which is how
    tests exercise it); ``tiny`` otherwise means random weights; another ``weights`` id
    replaces ``default_id``.
    """
    if params.weights and is_local_path(params.weights):
        return "local", params.weights
    if params.tiny or not params.pretrained:
        return "random", None
    return "hub", params.weights or default_id


def _library_weights(library, params, default_id):
    kind, source = library_weights_source(params, default_id)
    if kind == "random":
        return []
    return [WeightRef(source="local" if kind == "local" else library, id=str(source))]


def torchvision_weights(params, weights_id):
    """What :func:`mmcore.kit.vision.build_torchvision_model` loads for ``params`` (``weights_id``: its default)."""
    return _library_weights("torchvision", params, weights_id)


def timm_weights(params, model_name):
    """What :func:`mmcore.kit.vision.build_timm_model` loads for ``params`` (``model_name`` with its tag)."""
    return _library_weights("timm", params, model_name)
