"""What the torchvision and timm vision-encoder plugins share.

- :class:`FeatureMapEncoder`: a CNN whose feature map [B, C, H, W] becomes H*W tokens with a
  full mask; a plugin implements :meth:`~FeatureMapEncoder.feature_map` and ``blocks()``.
- :class:`TimmEncoder`: any timm model; tokens come from ``forward_features`` (a ViT's token
  sequence as is, a CNN's feature map as H*W tokens).
- :func:`build_timm_encoder`: a whole :class:`TimmEncoder` (the vit and timm plugins).
- :func:`build_torchvision_model` / :func:`build_timm_model`: one model with hub weights by
  id, a local weights file or directory, or random weights (``pretrained = false``, ``tiny``),
  every failure to load turned into one actionable line by :func:`mmcore.kit.weights.load_pretrained`;
  what each loads, declared without loading: :func:`mmcore.kit.weights.torchvision_weights` and
  :func:`~mmcore.kit.weights.timm_weights` (both read :func:`~mmcore.kit.weights.library_weights_source`).
- :func:`torchvision_preprocessing` / :func:`timm_preprocessing`: the eval transform the
  weights were trained with, as a picklable :class:`ResizeCropPreprocessing`.

torchvision and timm are imported inside the functions that need them: importing this module
is cheap, and timm is a dependency of the plugins that use it, not of mmcore.
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import torch

from mmcore.interfaces import Preprocessing, TokenOutput, VisionEncoder
from mmcore.kit.deps import require
from mmcore.kit.weights import WEIGHT_FILE_SUFFIXES, library_weights_source, load_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: file names looked for, in this order, when ``params.weights`` is a directory
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")


def _positive_int(instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be a positive number of pixels (got {value})")


@attrs.frozen(kw_only=True)
class ResizeCropPreprocessing(Preprocessing):
    """Resize the shorter side to ``resize_size``, then centre-crop ``size``.

    This is the ImageNet eval transform of torchvision's weights (e.g. 232 -> 224 for
    ResNet50 V2) and timm's (``crop_pct``); :class:`Preprocessing`'s ``shorter_center_crop``
    is the special case ``resize_size == min(size)``.
    """

    resize_size: int = attrs.field(validator=_positive_int)
    resize: str = attrs.field(
        default="shorter_center_crop", validator=attrs.validators.in_(("shorter_center_crop",))
    )

    @property
    def target_size(self):
        h, w = self.size
        return (max(h, self.resize_size), max(w, self.resize_size))

    def resized(self, image):
        """PIL RGB image -> the resized and cropped uint8 tensor [3, H, W]."""
        from mmcore.kit import pixels

        img = pixels.resize(pixels.pil_to_uint8(image), self.resize_size, self.interpolation)
        return pixels.center_crop(img, tuple(self.size))


def square_preprocessing(size, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear"):
    """Shorter side to ``size``, centre crop ``size`` x ``size`` (the tiny test encoders)."""
    return Preprocessing(
        size=(size, size),
        mean=tuple(mean),
        std=tuple(std),
        resize="shorter_center_crop",
        interpolation=interpolation,
    )


def torchvision_preprocessing(weights_id, *, size=None):
    """The eval transform of torchvision weights ``weights_id`` (``"ResNet50_Weights.IMAGENET1K_V2"``).

    Mean, std, interpolation, resize and crop come from the weights enum's own ``transforms()``
    (no download): for ``MobileNet_V3_Small_Weights.IMAGENET1K_V1`` that is resize 256, crop 224,
    ImageNet mean/std, bilinear. ``size`` crops to another side (a ``tiny`` build's 64 px),
    scaling the resize by the same factor.
    """
    from torchvision.models import get_weight

    transform = get_weight(weights_id).transforms()
    crop = transform.crop_size[0]
    resize = transform.resize_size[0]
    if size is not None:
        resize, crop = max(size, round(resize * size / crop)), size
    return ResizeCropPreprocessing(
        size=(crop, crop),
        resize_size=resize,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )


def timm_preprocessing(model, *, size=None):
    """The eval transform of a timm model's pretrained config (``size`` overrides the input size)."""
    require("timm", "this vision encoder")
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    size = size or config["input_size"][-1]
    common = dict(
        size=(size, size),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=config["interpolation"],
    )
    if config.get("crop_mode") == "squash":
        return Preprocessing(resize="squash", **common)
    crop_pct = config.get("crop_pct") or 1.0
    # timm's transforms_factory: scale_size = floor(img_size / crop_pct)
    return ResizeCropPreprocessing(resize_size=math.floor(size / crop_pct), **common)


@torch.no_grad()
def calibrate_batchnorm(model, image_size, *, seed=0, batch_size=8):
    """Re-estimate the BatchNorm statistics of a randomly initialised ``model`` on seeded noise; returns it.

    With its default running statistics (mean 0, variance 1) a random MobileNetV3 or EfficientNet
    in eval mode shrinks its input block by block, to features near 1e-8 that are the same for
    every image: a dead encoder (:mod:`mmcore.testing` refuses it). Measuring the statistics on
    one batch of ``image_size`` noise images (drawn from ``seed``, so every build is the same)
    keeps a random build alive. Only for random builds: pretrained weights bring their own.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    was_training = model.training
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics exactly
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    model.train()
    try:
        model(noise)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return model


# --- where the weights come from ---------------------------------------------------------


def local_weights_file(weights):
    """The weights file ``weights`` names: the file itself, or the one inside a directory."""
    path = Path(weights).expanduser().resolve()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or directory: {path}")
    for name in WEIGHT_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_FILE_SUFFIXES)
    if len(found) != 1:
        raise FileNotFoundError(
            f"{path} holds {len(found)} weight files; expected one of "
            f"{', '.join(WEIGHT_FILE_NAMES)} or a single *.pth/*.safetensors file"
        )
    return found[0]


def read_state_dict(path):
    """A state dict from a ``.safetensors`` file or a torch pickle (``{"state_dict": ...}`` too)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_state_dict_into(model, state, *, head_prefixes=()):
    """Load ``state`` strictly, except the classifier (``head_prefixes``), which mmcore never uses.

    A file may hold the head (torchvision's own checkpoints) or not (a backbone-only export).
    """
    heads = tuple(head_prefixes)
    state = {key: value for key, value in state.items() if not (heads and key.startswith(heads))}
    own = model.state_dict()
    missing = [key for key in own if key not in state and not (heads and key.startswith(heads))]
    unexpected = [key for key in state if key not in own]
    mismatched = [
        key for key in state if key in own and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}")
    if mismatched:
        key = mismatched[0]
        problems.append(
            f"{len(mismatched)} keys of another shape, e.g. {key!r} "
            f"{list(state[key].shape)} (the model's: {list(own[key].shape)})"
        )
    if problems:
        # one line: load_pretrained keeps only the first line of the reason
        raise ValueError(f"weights do not fit the architecture: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)
    return model


def build_torchvision_model(
    arch, weights_id, params, *, component, tiny, architecture=None, head_prefixes=()
):
    """A torchvision model and its weights label (hub id, local path or ``"random"``).

    ``arch`` names the builder in ``torchvision.models`` (``"resnet50"``) that downloads
    ``weights_id`` (``"ResNet50_Weights.IMAGENET1K_V2"``, any ``torchvision.models.get_weight``
    name). ``tiny`` and ``architecture`` are zero-argument callables building the test
    miniature and the full architecture with random weights (default: the builder with
    ``weights=None``; VGG skips its 120M-parameter classifier this way). ``head_prefixes``:
    the classifier's state-dict prefixes, ignored in a local weights file.
    """
    import torchvision.models

    def build_architecture():
        if params.tiny:
            return tiny()
        if architecture is not None:
            return architecture()
        return getattr(torchvision.models, arch)(weights=None)

    kind, source = library_weights_source(params, weights_id)
    if kind == "random":
        return build_architecture(), "random"
    if kind == "local":

        def load_local(path):
            state = read_state_dict(local_weights_file(path))
            return load_state_dict_into(build_architecture(), state, head_prefixes=head_prefixes)

        model = load_pretrained(load_local, source, component=component)
        return model, str(local_weights_file(source))

    def download(id_):
        return getattr(torchvision.models, arch)(weights=torchvision.models.get_weight(id_))

    return load_pretrained(download, source, component=component), source


#: timm model module -> (create_model kwargs, image size) of its test miniature (``tiny = true``)
TIMM_TINY = {
    "vision_transformer": (dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8), 32),
    "deit": (dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8), 32),
    "resnet": (dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)), 64),
    "convnext": (dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), 64),
}


def timm_family(model_name):
    """The timm module that defines ``model_name`` (``vision_transformer``, ``resnet``, ...)."""
    require("timm", "this vision encoder")
    import timm

    architecture = timm.models.split_model_name_tag(model_name)[0]
    return timm.models.model_entrypoint(architecture).__module__.rsplit(".", 1)[-1]


def build_timm_model(model_name, params, *, component, **kwargs):
    """A timm model without classifier, and its weights label (hub id, local path or ``"random"``).

    ``model_name`` may carry a pretrained tag (``vit_base_patch16_224.augreg2_in21k_ft_in1k``),
    which is also where the preprocessing comes from; ``kwargs`` go to ``timm.create_model``.
    """
    require("timm", "this vision encoder")
    import timm

    kwargs = {"num_classes": 0, **kwargs}
    kind, source = library_weights_source(params, model_name)
    if kind == "random":
        return timm.create_model(model_name, pretrained=False, **kwargs), "random"
    if kind == "local":

        def load_local(path):
            overlay = {"file": str(local_weights_file(path))}
            return timm.create_model(
                model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )

        model = load_pretrained(load_local, source, component=component)
        return model, str(local_weights_file(source))

    def download(id_):
        return timm.create_model(id_, pretrained=True, **kwargs)

    return load_pretrained(download, source, component=component), source


def build_timm_encoder(name, model_name, params):
    """The :class:`TimmEncoder` ``name`` around timm's ``model_name`` (``tiny``: :data:`TIMM_TINY`)."""
    from mmcore.errors import MmcoreError

    image_size = None
    kwargs = {}
    if params.tiny:
        family = timm_family(model_name)
        if family not in TIMM_TINY:
            raise MmcoreError(
                f"vision encoder {name!r}: tiny = true is not available for timm model "
                f"{model_name!r} ({family}); it is for {', '.join(sorted(TIMM_TINY))} models. "
                "Use a small model with pretrained = false instead"
            )
        kwargs, image_size = TIMM_TINY[family]
    model, weights = build_timm_model(
        model_name, params, component=f"vision encoder {name!r}", **kwargs
    )
    return TimmEncoder(
        model,
        name=name,
        weights=weights,
        preprocessing=timm_preprocessing(model, size=image_size),
    )


# --- encoders ----------------------------------------------------------------------------


def feature_map_tokens(feature_map, *, channels_last_output=False):
    """[B, C, H, W] (or [B, H, W, C] with ``channels_last_output``) -> H*W tokens, all real."""
    if not channels_last_output:
        feature_map = feature_map.permute(0, 2, 3, 1)
    b, h, w, c = feature_map.shape
    tokens = feature_map.reshape(b, h * w, c)
    mask = torch.ones(b, h * w, dtype=torch.bool, device=tokens.device)
    return TokenOutput(tokens, mask)


class _EncoderBase(VisionEncoder):
    def __init__(self, *, name, out_dim, preprocessing, weights, revision=None):
        super().__init__()
        self.name = name
        self.out_dim = out_dim
        self.preprocessing = preprocessing
        self.weights = weights
        self.revision = revision


class FeatureMapEncoder(_EncoderBase):
    """A CNN encoder: its final feature map [B, C, H, W] becomes H*W tokens with a full mask.

    Subclasses implement :meth:`feature_map` and ``blocks()``; ``out_dim`` is C.
    """

    has_cls_token = False
    channels_last = True

    def feature_map(self, pixel_values) -> torch.Tensor:
        """[B, 3, H, W] pixels -> the feature map [B, out_dim, h, w]."""
        raise NotImplementedError

    def forward(self, pixel_values):
        return feature_map_tokens(self.feature_map(pixel_values))


#: timm modules only ``forward_head`` runs (never ``forward_features``, which mmcore calls):
#: ConvNeXt's ``head`` (its ``head.norm``), a ViT's ``attn_pool`` (``global_pool = "map"``) and
#: ``fc_norm`` (``global_pool = "avg"``), the classifier ``head`` itself
TIMM_HEAD_MODULES = ("attn_pool", "fc_norm", "head_drop", "head")


def drop_unused_head(model):
    """Replace the head modules of timm ``model`` that hold weights by ``nn.Identity``; returns the names.

    Their parameters never receive a gradient, so DDP with every layer trainable
    (``finetune_layers = -1``) waits for them forever ("Expected to have finished reduction
    in the prior iteration"); dropped, they also leave the weights fingerprint and the
    checkpoint. Only mmcore's features are affected: ``forward_features`` does not use them.
    """
    dropped = []
    for name in TIMM_HEAD_MODULES:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module) and any(True for _ in module.parameters()):
            setattr(model, name, torch.nn.Identity())
            dropped.append(name)
    return dropped


class TimmEncoder(_EncoderBase):
    """Any timm model: tokens from ``forward_features``.

    A transformer's [B, N, D] token sequence is used as is (prefix tokens first:
    ``has_cls_token`` when the model has a class token); a CNN's feature map becomes H*W
    tokens. ``blocks()`` are the model's ``blocks``, ``stages`` or ResNet residual blocks;
    ``final_norm()`` is the norm ``forward_features`` ends with (a ViT's ``norm``).
    """

    def __init__(self, model, **kwargs):
        super().__init__(out_dim=model.num_features, **kwargs)
        drop_unused_head(model)
        self.model = model
        self.has_cls_token = getattr(model, "cls_token", None) is not None and (
            getattr(model, "num_prefix_tokens", 0) > 0
        )
        # timm ViT blocks: attn.qkv and attn.proj are the only modules named qkv/proj in a
        # block (the core only looks inside blocks, so patch_embed.proj is never wrapped)
        attention = any(name.endswith(".attn.qkv") for name, _ in model.named_modules())
        self.lora_target_modules = ("qkv", "proj") if attention else ()
        self._nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        # ViT-style models (which count prefix tokens) emit [B, N, D]; channels_last helps CNNs
        self.channels_last = not hasattr(model, "num_prefix_tokens")

    def forward(self, pixel_values):
        out = self.model.forward_features(pixel_values)
        if out.ndim == 3:
            mask = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
            return TokenOutput(out, mask)
        return feature_map_tokens(out, channels_last_output=self._nhwc)

    def blocks(self):
        model = self.model
        for attr in ("blocks", "stages", "layers"):
            container = getattr(model, attr, None)
            if isinstance(container, (torch.nn.Sequential, torch.nn.ModuleList)):
                return list(container)
        layers = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
        if layers:  # ResNet family: residual blocks, input to output
            return [block for layer in layers for block in layer]
        from mmcore.errors import MmcoreError

        raise MmcoreError(
            f"vision encoder {self.name!r}: cannot find the blocks of timm model "
            f"{type(model).__name__} (no blocks/stages/layers); use finetune_layers = 0 or -1"
        )

    def final_norm(self):
        model = self.model
        if hasattr(model, "conv_head") and hasattr(model, "bn2"):
            # EfficientNet/MobileNet: forward_features ends with a 1x1 conv + norm after the
            # blocks; a container (not registered) lets the core unfreeze both with top-N
            return torch.nn.Sequential(model.conv_head, model.bn2)
        norm = getattr(model, "norm", None)
        if norm is None or isinstance(norm, torch.nn.Identity):
            return None
        return norm
