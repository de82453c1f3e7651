"""The ``imagestats`` vision encoder: classical image statistics, no weights, nothing to train.

Rendered ads (flat colours, few distinct colours, text strokes: many short horizontal and
vertical edges) and photographs differ in statistics a network trained from scratch on a
few thousand images learns slowly. This encoder computes them directly, as histograms of the
resized image (``size`` x ``size``):

``color4`` / ``color8``
    joint RGB histograms, 4 and 8 levels per channel (64 and 512 bins): the palette.
``gray``
    luminance, 16 bins.
``saturation``
    HSV saturation, 8 bins.
``gradient``
    gradient magnitude, 8 bins (on its square root).
``orientation``
    gradient direction (modulo pi), 8 bins centred on 0, pi/8, ..., weighted by magnitude.
``layout``
    where the edges are: gradient energy in a 4 x 4 grid of cells.
``lbp``
    local binary patterns: which of each pixel's 8 neighbours is brighter (by at least half a grey
    level), 256 codes (texture).

Each block is a distribution (its bins sum to 1); the encoder returns its square root (the
Hellinger map, under which a linear head compares histograms well), so every block has unit
L2 norm, and the concatenation is divided by the square root of the number of blocks: the
vector has unit norm whatever the image. It is one token (mean pooling passes it on as is).

The encoder has no parameters: it is always frozen, so the engine caches its output, and only
the head trains. Nothing is fitted either: the same image always gives the same vector.
"""

from __future__ import annotations

import math

import attrs
import torch

from mmcore import (
    NO_WEIGHTS, FieldError, NoWeightsParams, Preprocessing, TokenOutput, VisionEncoder, VisionTraits, hookimpl, identity_string,
)

#: block name -> number of bins
BLOCKS = {
    "color4": 64,
    "color8": 512,
    "gray": 16,
    "saturation": 8,
    "gradient": 8,
    "orientation": 8,
    "layout": 16,
    "lbp": 256,
}

#: bumped whenever a block is computed differently: part of the identity, so no cache serves old features
FEATURES_VERSION = 2
_LUMA = (0.299, 0.587, 0.114)
#: (dy, dx) of the 8 neighbours, one bit each, clockwise from the top left
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _size(instance, attribute, value):
    if not isinstance(value, int) or value < 16:
        raise FieldError(attribute.name, f"must be a whole number of pixels >= 16 (got {value!r})")


def _features(instance, attribute, value):
    unknown = [name for name in value if name not in BLOCKS]
    if unknown or not value:
        raise FieldError(
            attribute.name,
            f"unknown block {unknown[0]!r}; choose from {', '.join(BLOCKS)}" if unknown
            else f"name at least one of {', '.join(BLOCKS)}",
        )
    if len(set(value)) != len(value):
        raise FieldError(attribute.name, f"names a block twice (got {list(value)})")


@attrs.frozen(kw_only=True)
class ImageStatsParams(NoWeightsParams):
    """``size``: the square the image is resized to (squashed) before its statistics are taken;
    ``features``: which blocks to compute, in this order (all by default)."""

    size: int = attrs.field(default=128, validator=_size)
    features: tuple[str, ...] = attrs.field(factory=lambda: tuple(BLOCKS), converter=tuple, validator=_features)


def _histogram(index, bins, weight=None):
    """Per-image normalised histogram: ``index`` [B, ...] of ints in [0, bins) -> [B, bins]."""
    index = index.reshape(index.shape[0], -1)
    weight = torch.ones_like(index, dtype=torch.float32) if weight is None else weight.reshape(index.shape)
    counts = torch.zeros(index.shape[0], bins, dtype=weight.dtype, device=index.device)
    counts = counts.scatter_add(1, index, weight)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-12)


def _levels(x, n):
    """Values in [0, 1] -> integer levels 0..n-1."""
    return (x * n).clamp(0, n - 1).long()


class _Statistics(torch.nn.Module):
    """The one 'block': pixels [B, 3, H, W] in [0, 1] -> concatenated sqrt-histograms [B, D]."""

    def __init__(self, features):
        super().__init__()
        self.features = tuple(features)

    def forward(self, pixels):
        rgb = pixels.float().clamp(0, 1)
        gray = sum(w * rgb[:, c] for c, w in enumerate(_LUMA))
        dx = gray[:, :-1, 1:] - gray[:, :-1, :-1]
        dy = gray[:, 1:, :-1] - gray[:, :-1, :-1]
        magnitude = torch.sqrt(dx * dx + dy * dy)
        out = []
        for name in self.features:
            out.append(getattr(self, f"_{name}")(rgb, gray, dx, dy, magnitude).sqrt())
        return torch.cat(out, dim=1) / math.sqrt(len(out))

    def _color4(self, rgb, *_):
        q = _levels(rgb, 4)
        return _histogram(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], 64)

    def _color8(self, rgb, *_):
        q = _levels(rgb, 8)
        return _histogram(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], 512)

    def _gray(self, rgb, gray, *_):
        return _histogram(_levels(gray, 16), 16)

    def _saturation(self, rgb, *_):
        high, low = rgb.amax(dim=1), rgb.amin(dim=1)
        return _histogram(_levels((high - low) / high.clamp_min(1e-6), 8), 8)

    def _gradient(self, rgb, gray, dx, dy, magnitude):
        return _histogram(_levels(torch.sqrt(magnitude / 1.5), 8), 8)  # |grad| <= sqrt(2)

    def _orientation(self, rgb, gray, dx, dy, magnitude):
        # where there is no gradient the angle is undefined (ONNX's atan2 gives NaN for 0/0): 0 there,
        # and its weight is ~0 anyway. Bins are centred on 0, pi/8, ...: horizontal, vertical and
        # diagonal edges (common in rendered images) sit mid-bin, not on a boundary a rounding could flip
        angle = torch.where(magnitude > 0, torch.atan2(dy, dx), torch.zeros_like(magnitude))
        position = angle / math.pi * 8 + 0.5  # in [-7.5, 8.5]
        index = torch.floor(position).long() % 8  # direction, not sign: angle and angle - pi share a bin
        return _histogram(index, 8, magnitude + 1e-6)

    def _layout(self, rgb, gray, dx, dy, magnitude):
        b, h, w = magnitude.shape
        ch, cw = h // 4, w // 4
        cells = magnitude[:, : ch * 4, : cw * 4].reshape(b, 4, ch, 4, cw).sum(dim=(2, 4)) + 1e-6
        return cells.reshape(b, 16) / cells.reshape(b, 16).sum(dim=1, keepdim=True)

    def _lbp(self, rgb, gray, *_):
        h, w = gray.shape[-2:]
        centre = gray[:, 1:-1, 1:-1]
        code = torch.zeros_like(centre, dtype=torch.long)
        for bit, (oy, ox) in enumerate(_NEIGHBOURS):
            neighbour = gray[:, 1 + oy : h - 1 + oy, 1 + ox : w - 1 + ox]
            # half a grey level: a neighbour one level brighter counts, equal ones (flat areas) do not
            code = code + (neighbour >= centre + 0.5 / 255).long() * (1 << bit)
        return _histogram(code, 256)


class ImageStatsEncoder(VisionEncoder):
    """Histograms of colour, luminance, saturation, gradients and local binary patterns; one token."""

    name = "imagestats"
    weights = NO_WEIGHTS
    #: no parameters: nothing trains, top-N and LoRA do not apply, the output is always cached
    trainable = False

    def __init__(self, params):
        super().__init__()
        self.params = params
        # pixels in [0, 1]: mean 0, std 1 leaves the loader's uint8 -> float scaling as it is
        self.preprocessing = Preprocessing(
            size=(params.size, params.size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
            resize="squash", interpolation="bicubic",
        )
        self.statistics = _Statistics(params.features)
        self.out_dim = sum(BLOCKS[name] for name in params.features)

    def forward(self, pixel_values):
        tokens = self.statistics(pixel_values).unsqueeze(1)  # float32 whatever the input: counts need no less
        return TokenOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def blocks(self):
        return [self.statistics]

    @property
    def identity(self):
        return identity_string(
            self.name, self.weights, None,
            {"params": attrs.asdict(self.params), "preprocessing": self.preprocessing.describe(), "out_dim": self.out_dim,
             "version": FEATURES_VERSION},
        )


def build_imagestats(params):
    return ImageStatsEncoder(params)


@hookimpl
def register_vision_encoders(register):
    # a fixed extractor, said before anything is built: a recipe that asks it to train is refused at load
    register("imagestats", build_imagestats, ImageStatsParams, traits=VisionTraits(has_cls_token=False, trainable=False))
