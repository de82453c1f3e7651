"""Tiny, fast, offline encoders for mmcore's tests (a real plugin package, installed with pip).

``fake_cnn``: a 3-block CNN whose 4x4 feature map becomes 16 tokens (no CLS).
``fake_vit``: a 2-block transformer over 4x4 patches with a CLS token first.
``fake_text``: a hashed bag of character trigrams -> fixed random projection (frozen).
"""

import hashlib

import attrs
import torch
from torch import nn

from mmcore import VisionTraits, hookimpl
from mmcore.interfaces import EncoderParams, OcrEngine, Preprocessing, TextEncoder, TokenOutput, VisionEncoder


@attrs.frozen(kw_only=True)
class FakeVisionParams(EncoderParams):
    """``width``: channels / hidden size; ``image_size``: input side in pixels."""

    width: int = 16
    image_size: int = 32
    #: test knob: after this many training-mode forward passes, output NaN (0 = never)
    nan_after: int = 0


class FakeCnn(VisionEncoder):
    name = "fake_cnn"
    channels_last = True

    def __init__(self, params):
        super().__init__()
        w = params.width
        self.out_dim = w
        self.preprocessing = Preprocessing(size=(params.image_size, params.image_size), mean=(0.5,) * 3, std=(0.25,) * 3)
        self.stem = nn.Conv2d(3, w, 3, stride=2, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, w, 3, stride=2 if i < 2 else 1, padding=1), nn.BatchNorm2d(w), nn.ReLU())
            for i in range(3)
        )
        self.nan_after = params.nan_after
        self.training_calls = 0

    def forward(self, pixel_values):
        x = self.stem(pixel_values)
        for layer in self.layers:
            x = layer(x)
        tokens = x.flatten(2).transpose(1, 2)
        if self.training:
            self.training_calls += 1
            if self.nan_after and self.training_calls > self.nan_after:
                tokens = tokens * float("nan")
        return TokenOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def blocks(self):
        return list(self.layers)


class FakeVit(VisionEncoder):
    name = "fake_vit"
    has_cls_token = True
    lora_target_modules = ("q_proj", "v_proj")

    def __init__(self, params):
        super().__init__()
        w = params.width
        self.out_dim = w
        self.preprocessing = Preprocessing(size=(params.image_size, params.image_size))
        patch = params.image_size // 4
        self.patch = nn.Conv2d(3, w, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.layers = nn.ModuleList(_Block(w) for _ in range(2))
        self.norm = nn.LayerNorm(w)

    def forward(self, pixel_values):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return TokenOutput(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))

    def blocks(self):
        return list(self.layers)

    def final_norm(self):
        return self.norm


class _Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w)
        self.mlp = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w), nn.GELU())

    def forward(self, x):
        attn = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        x = x + attn @ self.v_proj(x)
        return x + self.mlp(x)


@attrs.frozen(kw_only=True)
class FakeTextParams(EncoderParams):
    dim: int = 32
    buckets: int = 512


class FakeText(TextEncoder):
    """Character-trigram hashing + a fixed random projection: deterministic, meaningful, offline."""

    name = "fake_text"

    def __init__(self, params):
        super().__init__()
        self.out_dim = params.dim
        self.buckets = params.buckets
        generator = torch.Generator().manual_seed(1234)
        self.register_buffer("projection", torch.randn(params.buckets, params.dim, generator=generator))

    def identity_extra(self):
        return {"buckets": self.buckets}

    def encode(self, texts):
        counts = torch.zeros(len(texts), self.buckets, device=self.projection.device)
        for i, text in enumerate(texts):
            text = f"  {text.lower()}  "
            for j in range(len(text) - 2):
                digest = hashlib.md5(text[j : j + 3].encode()).digest()
                counts[i, int.from_bytes(digest[:4], "little") % self.buckets] += 1
        counts = torch.log1p(counts)
        return torch.nn.functional.normalize(counts @ self.projection, dim=-1)


@hookimpl
def register_vision_encoders(register):
    register("fake_cnn", FakeCnn, FakeVisionParams, traits=VisionTraits(has_cls_token=False))
    register("fake_vit", FakeVit, FakeVisionParams, traits=VisionTraits(has_cls_token=True))


@hookimpl
def register_text_encoders(register):
    register("fake_text", FakeText, FakeTextParams)


@attrs.frozen(kw_only=True)
class FakeOcrParams:
    pass


class FakeOcr(OcrEngine):
    """Describes the image's mean colour ("tone 3 1 0"): OCR plumbing without Tesseract.

    Each call appends a line to ``$MMCORE_FAKE_OCR_LOG`` when set, so tests can count reads.
    """

    name = "fake_ocr"

    def read(self, image, lang):
        import os

        import numpy as np

        log = os.environ.get("MMCORE_FAKE_OCR_LOG")
        if log:
            with open(log, "a") as handle:
                handle.write("read\n")
        r, g, b = (np.asarray(image.convert("RGB"), dtype=float).mean(axis=(0, 1)) // 64).astype(int)
        return f"tone {r} {g} {b}"


@hookimpl
def register_ocr_engines(register):
    register("fake_ocr", lambda params: FakeOcr(), FakeOcrParams)
