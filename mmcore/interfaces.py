"""What plugins provide: encoders, poolings, fusions, heads, OCR engines, and image preprocessing.

A vision encoder turns preprocessed pixels into a token sequence plus a padding mask
(a CNN feature map [B, C, H, W] becomes H*W tokens with a full mask). A text encoder turns
a batch of strings into one vector per string. Both carry an ``identity`` string
(name + weights + revision + preprocessing) that keys the feature cache: two encoders with
the same identity must produce the same outputs for the same input. A :class:`Pooling` turns
the tokens into one vector, a :class:`Fusion` joins the two modalities' vectors
(:class:`FusionOutput`), a :class:`Head` scores the result; the classifier returns a
:class:`ModelOutput`.

Preprocessing is *data*: a picklable object that the data-loader workers call on a decoded
PIL image. The training process never resizes images.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import attrs
import torch
from torch import nn

from mmcore.validators import FieldError


class TokenOutput(NamedTuple):
    """Encoder output: ``tokens`` [B, N, D] and ``mask`` [B, N] (bool, True = a real token)."""

    tokens: torch.Tensor
    mask: torch.Tensor


RESIZE_POLICIES = ("squash", "shorter_center_crop", "letterbox")


@attrs.frozen(kw_only=True)
class Preprocessing:
    """How the loader turns a decoded RGB image into the encoder's input.

    ``size`` is (height, width). ``resize``: ``squash`` (stretch to size),
    ``shorter_center_crop`` (resize the shorter side, centre crop; torchvision's eval transform),
    ``letterbox`` (keep the aspect ratio, pad). Subclasses may override :meth:`__call__` and
    :meth:`collate` (NaFlex does: variable patch counts, padded in ``collate``).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = attrs.field(default="squash", validator=attrs.validators.in_(RESIZE_POLICIES))
    interpolation: str = "bicubic"

    @property
    def target_size(self):
        """The largest (height, width) this preprocessing produces (used for JPEG draft())."""
        return self.size

    def describe(self):
        """A plain dict of everything that changes the output (part of the encoder identity)."""
        data = attrs.asdict(self)
        data["type"] = type(self).__qualname__
        return data

    def resized(self, image):
        """PIL RGB image -> the resized uint8 tensor [3, H, W] (everything but normalisation).

        torchvision's v2 resize, centre crop and pad, computed with torch alone
        (:mod:`mmcore.kit.pixels`: a scoring process need not import torchvision).
        """
        from mmcore.kit import pixels

        h, w = self.size
        img = pixels.pil_to_uint8(image)
        if self.resize == "squash":
            img = pixels.resize(img, [h, w], self.interpolation)
        elif self.resize == "shorter_center_crop":
            img = pixels.resize(img, min(h, w), self.interpolation)
            img = pixels.center_crop(img, (h, w))
        else:  # letterbox
            ih, iw = img.shape[-2:]
            scale = min(h / ih, w / iw)
            nh, nw = max(1, round(ih * scale)), max(1, round(iw * scale))
            img = pixels.resize(img, [nh, nw], self.interpolation)
            top, left = (h - nh) // 2, (w - nw) // 2
            img = pixels.pad(img, left=left, top=top, right=w - nw - left, bottom=h - nh - top)
        return img

    #: (input name, axis) of the encoder's inputs whose length changes from batch to batch
    #: (NaFlex: the patch axis); torch.compile marks them dynamic instead of recompiling
    variable_axes = ()

    def normalize(self, pixels):
        """uint8 pixels [..., 3, H, W] (any device) -> float32 normalized, as :meth:`__call__` gives.

        The same arithmetic as torchvision's ``to_dtype`` and ``normalize``, with the mean and std
        kept on the pixels' device (:func:`channel_constants`): torchvision copies them there on
        every call, which on a GPU waits for the host each step.
        """
        from mmcore.kit.pixels import uint8_to_float

        mean, std = channel_constants(self.mean, self.std, pixels.device, shape=(-1, 1, 1))
        return uint8_to_float(pixels).sub(mean).div_(std)

    def uint8_item(self, image):
        """PIL RGB image -> what loader workers hand over with uint8 loading: :meth:`__call__`'s
        inputs with uint8 ``pixel_values`` that :meth:`normalize` turns into :meth:`__call__`'s."""
        return {"pixel_values": self.resized(image)}

    @property
    def uint8_pixels(self):
        """True when ``normalize`` of :meth:`uint8_item` is :meth:`__call__`: loaders may hand over
        uint8 pixels and normalise on the device. A subclass that overrides :meth:`__call__`
        keeps float loading unless it overrides this, :meth:`uint8_item` and :meth:`normalize` (NaFlex)."""
        return self.plain_resize

    @property
    def plain_resize(self):
        """True when the output is ``normalize(resized(image))`` at the fixed :attr:`size`: the
        decoded-image cache may store :meth:`resized` rows."""
        return type(self).__call__ is Preprocessing.__call__

    def __call__(self, image):
        """PIL RGB image -> ``{"pixel_values": float tensor [3, H, W]}`` normalized."""
        return {"pixel_values": self.normalize(self.resized(image))}

    def collate(self, items):
        """A list of per-image dicts -> one batch dict (stacked tensors)."""
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


_CHANNEL_CONSTANTS = {}


def channel_constants(mean, std, device, *, shape):
    """``mean`` and ``std`` as float32 tensors of ``shape`` on ``device``, made once per device.

    Normalising on a GPU with constants built from Python lists copies them host-to-device on
    every call, a wait on the host each step; these stay where the pixels are.
    """
    if torch.compiler.is_compiling():  # a compiled graph holds its constants itself
        return _make_constants(mean, std, device, shape)
    key = (tuple(mean), tuple(std), torch.device(device), tuple(shape))
    if key not in _CHANNEL_CONSTANTS:
        _CHANNEL_CONSTANTS[key] = _make_constants(mean, std, device, shape)
    return _CHANNEL_CONSTANTS[key]


def _make_constants(mean, std, device, shape):
    return tuple(torch.tensor(values, dtype=torch.float32, device=device).reshape(shape) for values in (mean, std))


#: the ``weights`` of an encoder that loads none (built from its params alone)
NO_WEIGHTS = "none"


def identity_string(name, weights, revision, extra):
    """``name|weights|revision|<hash of extra>`` — stable across processes and versions.

    A missing revision reads ``main`` (the hub's default branch), or ``-`` for an encoder
    with :data:`NO_WEIGHTS`: ``char_ngrams|none|-|3f2a...``.
    """
    blob = json.dumps(extra, sort_keys=True, default=str).encode()
    shown = revision or ("-" if weights == NO_WEIGHTS else "main")
    return f"{name}|{weights}|{shown}|{hashlib.sha256(blob).hexdigest()[:16]}"


class VisionEncoder(nn.Module):
    """Base class for vision encoders.

    Subclasses set ``name``, ``out_dim``, ``has_cls_token``, ``preprocessing``,
    ``weights`` (hub id, local path or ``"random"``), ``revision``, and implement
    :meth:`forward` and :meth:`blocks`. Everything about trainability (freeze, top-N,
    LoRA, optimizer groups) is derived by the core from :meth:`blocks`,
    :meth:`final_norm` and ``lora_target_modules``. ``has_cls_token`` and ``trainable`` must
    agree with the :class:`~mmcore.plugins.traits.VisionTraits` the plugin registered (building
    checks them).
    """

    name: str = ""
    out_dim: int = 0
    has_cls_token: bool = False
    #: module-name suffixes peft may wrap with LoRA (e.g. ("q_proj", "k_proj", "v_proj"))
    lora_target_modules: tuple[str, ...] = ()
    #: True for CNNs: the engine converts the model and inputs to channels_last
    channels_last: bool = False
    #: False for a fixed feature extractor (colour histograms, texture statistics): it has no
    #: parameters, is always frozen (so its output is cached) and a recipe that asks it to
    #: train (``finetune_layers``, ``freeze_backbone = false``, LoRA) is an error naming the key
    trainable: bool = True
    preprocessing: Preprocessing
    weights: str = "random"
    revision: str | None = None

    def forward(self, **inputs) -> TokenOutput:
        """Inputs as produced by ``preprocessing.collate`` -> :class:`TokenOutput`."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The encoder's blocks in order from input to output (for top-N and LoRA)."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module | None:
        """The norm after the last block (unfrozen with the top-N blocks), if any."""
        return None

    def block_prefixes(self) -> list[str]:
        """Qualified module names of :meth:`blocks`, in order (used for LoRA targeting)."""
        names = {id(module): name for name, module in self.named_modules()}
        return [names[id(block)] for block in self.blocks()]

    def enable_gradient_checkpointing(self) -> bool:
        """Turn on activation checkpointing (``train.gradient_checkpointing``) -> whether it could.

        The default finds the switch of a Hugging Face model (``activation_checkpointing_enable``,
        or ``gradient_checkpointing_enable`` before transformers 5; non-reentrant) or a timm model
        (``set_grad_checkpointing``) on the encoder or its wrapped ``model``. Override it for a
        model of your own; return False when it cannot (the run warns and trains without).
        """
        for module in (self, getattr(self, "model", None)):
            if not isinstance(module, nn.Module) or not getattr(module, "supports_gradient_checkpointing", True):
                continue
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                return True
            if hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                return True
            if hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(True)
                return True
        return False

    @property
    def identity(self) -> str:
        """Stable key of what this encoder computes (name, weights, revision, preprocessing)."""
        return identity_string(
            self.name,
            self.weights,
            self.revision,
            {"preprocessing": self.preprocessing.describe(), "out_dim": self.out_dim},
        )


class TextEncoder(nn.Module):
    """Base class for text encoders (always frozen in mmcore).

    Subclasses set ``name``, ``out_dim``, ``weights``, ``revision`` and implement
    :meth:`encode`. ``forward`` runs :meth:`encode` without gradients; :attr:`device` says
    where to put the tensors ``encode`` makes (an encoder without parameters needs no dummy buffer).
    """

    name: str = ""
    out_dim: int = 0
    weights: str = "random"
    revision: str | None = None
    #: texts per forward pass when embedding a whole dataset
    batch_size: int = 64

    def __init__(self):
        super().__init__()
        # follows .to(device) even in an encoder without parameters, so that :attr:`device` is
        # right; not persistent: checkpoints and state dicts do not change
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        """Where this encoder lives (it follows ``.to(device)``, parameters or not)."""
        return self._device_anchor.device

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed a batch of strings -> float tensor [B, out_dim] on :attr:`device`."""
        raise NotImplementedError

    #: True for encoders whose state is fitted on the training split (e.g. n-gram statistics):
    #: a run calls :meth:`fit` on the training texts before anything is encoded
    fits_on_train: bool = False

    def forward(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.encode(list(texts)).float()

    def fit(self, texts: list[str]) -> None:
        """Fit the encoder's state on the training texts (only called when ``fits_on_train``).

        Keep the fitted state in tensors registered as buffers (no pickle): the run's checkpoints
        carry them, so ``eval``, ``predict``, ``export`` and ``serve`` restore them without fitting
        again. Name them in :meth:`fitted_state_keys`, and put a digest of them in
        :meth:`identity_extra` so the feature cache never mixes two fits.
        """

    def fitted_state_keys(self) -> list[str]:
        """``state_dict`` keys that hold fitted state (always saved, even for pretrained encoders)."""
        return []

    def host_features(self) -> HostFeaturizer | None:
        """The string half of an encoder that has no Hugging Face tokenizer, or None.

        ``mmcore export`` keeps string work outside the ONNX graph. Encoders built on
        :mod:`mmcore.kit.text` keep a tokenizer there; an encoder that turns strings into
        vectors some other way (hashed n-grams) is exportable when it splits itself in two:
        a :class:`HostFeaturizer` (strings -> named float32 arrays, stored in the bundle as
        data) and :meth:`encode_features` (those arrays as tensors -> the embedding, traced into
        the graph with the encoder's buffers). Make :meth:`encode` call exactly
        ``encode_features`` on the featurizer's output, so training, ``predict`` and the bundle
        share one computation.
        """
        return None

    def encode_features(self, **features: torch.Tensor) -> torch.Tensor:
        """The tensor half (see :meth:`host_features`): the featurizer's arrays as float tensors
        [B, n], by name -> [B, out_dim]. Tensor operations only, so that it traces into ONNX."""
        raise NotImplementedError(f"{type(self).__name__} has no host featurizer (host_features)")

    def identity_extra(self) -> dict:
        """Anything beyond name/weights/revision that changes the embedding (prefixes, pooling)."""
        return {}

    @property
    def identity(self) -> str:
        return identity_string(
            self.name,
            self.weights,
            self.revision,
            {"out_dim": self.out_dim, **self.identity_extra()},
        )


class HostFeaturizer:
    """The host side of an exportable text encoder without a tokenizer (see
    :meth:`TextEncoder.host_features`): strings -> ``{name: float32 array [B, n]}``.

    Subclass it as a frozen attrs class whose fields are plain JSON data (str, int, float, bool
    and lists of them): an export bundle stores its module, class and fields, never a pickle,
    and rebuilds it from them, so the plugin that defines it must be installed where the bundle
    is scored. Fitted state does not belong here: keep it in the encoder's buffers, where the
    graph carries it.
    """

    @property
    def names(self) -> tuple[str, ...]:
        """The arrays :meth:`__call__` returns, in the order the graph takes them."""
        raise NotImplementedError

    def __call__(self, texts: list[str]) -> dict:
        """A batch of strings -> ``{name: np.ndarray float32 [B, n]}`` for every name in :attr:`names`."""
        raise NotImplementedError


class OcrEngine:
    """Base class for OCR engines: ``read(image) -> str`` on a PIL image."""

    name: str = ""

    def read(self, image, lang: str) -> str:
        raise NotImplementedError

    @property
    def identity(self) -> str:
        return identity_string(self.name, "n/a", None, {})


@attrs.frozen(kw_only=True)
class EncoderParams:
    """Params every encoder plugin accepts (plugins subclass this and add their own).

    ``pretrained = false`` builds from the architecture's config with random weights (offline).
    ``weights`` overrides the hub id with another id or a local directory.
    ``tiny = true`` builds a test-only miniature of the same architecture (random weights).
    """

    pretrained: bool = True
    weights: str | None = None
    revision: str | None = None
    tiny: bool = False


@attrs.frozen(kw_only=True)
class NoParams:
    """Params of a component that takes none (``[fusion] name = "concat"``)."""


def _loads_nothing(instance, attribute, value):
    if attribute.name == "pretrained" and value:
        raise FieldError("pretrained", "this encoder has no pretrained weights (it is built from its params); remove the key")
    if attribute.name != "pretrained" and value is not None:
        raise FieldError(attribute.name, f"this encoder loads no weights, so it takes no {attribute.name} (got {value!r}); remove the key")


@attrs.frozen(kw_only=True)
class NoWeightsParams(EncoderParams):
    """Params base of an encoder that loads nothing (a hashing vectorizer, a fixed random projection).

    ``pretrained`` defaults to false, and ``pretrained = true``, ``weights`` or ``revision`` in a
    recipe are errors naming the key (``recipe.toml: text.params.weights: this encoder loads no
    weights ...``), found by ``mmcore show`` before anything runs. Set the encoder's ``weights``
    to :data:`NO_WEIGHTS`; its identity then reads ``name|none|-|...``.
    """

    pretrained: bool = attrs.field(default=False, validator=_loads_nothing)
    weights: str | None = attrs.field(default=None, validator=_loads_nothing)
    revision: str | None = attrs.field(default=None, validator=_loads_nothing)


# --- what the model around the encoders is made of --------------------------------------------


class Pooling(nn.Module):
    """Base class for poolings: a token sequence -> one vector per sample.

    ``register_poolings`` registers ``factory(params, dim, has_cls_token) -> Pooling``. What
    :meth:`forward` gets is exactly what the engine sends, and what
    :func:`mmcore.testing.check_pooling` sends:

    - ``tokens`` [B, N, dim], floating point but not always float32: token sequences read from
      the feature cache are float16, and under autocast an encoder emits bfloat16 or float16.
      Cast to your parameters' dtype before using them together
      (``tokens = tokens.to(self.gate.weight.dtype)``).
    - ``mask`` [B, N] bool (True = a real token), or ``None``: every token is real. A batch of
      sequences of one length (every CNN, a fixed-resolution ViT, their cached tokens) comes
      without a mask, so that fused attention kernels apply.

    Padded tokens (mask False) may hold anything and must not change the result. Returns
    [B, dim]. A pooling trains when it has parameters; the feature cache then stores a frozen
    encoder's token sequences, else the pooled vectors (nothing to declare).
    """

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class AuxiliaryLogits(NamedTuple):
    """Logits that a fusion wants trained by losses of their own (late fusion: one per modality).

    The training step adds ``weight * loss(logit, labels)`` for each of ``logits`` (each [B])
    to the loss of the classifier's logit.
    """

    weight: float
    logits: tuple[torch.Tensor, ...]


class FusionOutput(NamedTuple):
    """What a :class:`Fusion` returns.

    ``fused`` [B, out_dim]: what the head scores. ``aux_logits``: :class:`AuxiliaryLogits` of a
    training forward, or None. ``gate``: how much each sample's fused vector comes from the
    image (1) rather than the text (0), [B] or [B, k] in [0, 1] (the GMU's gate ``z``), or None
    for a fusion without one; the evaluation report shows its mean.
    """

    fused: torch.Tensor
    aux_logits: AuxiliaryLogits | None = None
    gate: torch.Tensor | None = None


class Fusion(nn.Module):
    """Base class for fusions: (vision [B, vision_dim], text [B, text_dim]) -> :class:`FusionOutput`.

    ``register_fusions`` registers ``factory(params, vision_dim, text_dim) -> Fusion``. Set
    :attr:`out_dim`, the width of ``fused``. A fusion says everything through its output: what it
    means to keep out of the head's gradient it detaches itself, and logits it wants trained by
    their own losses it returns as ``aux_logits`` (in training; see ``builtin/fusion.py``'s
    ``late``). Batches are float32, or bfloat16/float16 under autocast.
    """

    #: width of ``FusionOutput.fused``
    out_dim: int = 0

    def forward(self, vision: torch.Tensor, text: torch.Tensor) -> FusionOutput:
        raise NotImplementedError

    def init_head(self, head: nn.Module) -> None:
        """Called once with the head built on this fusion, before training: a fusion whose
        output a head can start from in a known way initialises it (late fusion: a linear head
        starts as the sum of the two logits). The default does nothing."""


class Head(nn.Module):
    """Base class for heads: features [B, in_dim] -> logits [B] (one per sample, not [B, 1]).

    ``register_heads`` registers ``factory(params, in_dim) -> Head``.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ModelOutput(NamedTuple):
    """What the classifier returns: ``logit`` [B], one per sample, and ``aux``, the fusion's
    :class:`AuxiliaryLogits` of a training forward (None otherwise). Callers that score take
    ``model(batch).logit``; the training step adds the auxiliary losses."""

    logit: torch.Tensor
    aux: AuxiliaryLogits | None = None
