"""Contract checks a plugin's own tests call.

```python
from mmcore.testing import check_vision_encoder

def test_contract():
    check_vision_encoder("resnet50", {"pretrained": False, "tiny": True})
```

Each check builds the component through the registry (so the entry point is exercised),
runs it on a batch of 2 and asserts the contract the engine relies on; a broken contract
raises ``AssertionError`` with a message saying which rule failed.
"""

from __future__ import annotations

import pickle

import numpy as np
import torch

from .interfaces import TextEncoder, TokenOutput, VisionEncoder

__all__ = ["check_vision_encoder", "check_text_encoder", "build", "sample_images"]


def build(kind, name, params=None, registry=None):
    """Build a registered component from a params dict, as a recipe would."""
    from .plugins import get_registry
    from .recipe import structure

    registry = registry or get_registry()
    registration = registry.get(kind, name)
    structured = structure(dict(params or {}), registration.params_cls, source=f"<{name} params>", path="params")
    return registration.factory(structured)


def sample_images(seed=0):
    """Two RGB PIL images of different sizes and aspect ratios, with some structure."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for width, height in ((96, 64), (48, 120)):
        array = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(array)
        ImageDraw.Draw(image).rectangle([5, 5, width // 2, height // 3], fill=(250, 20, 20))
        images.append(image)
    return images


def _pipeline(encoder, out, registry):
    """tokens -> pooling -> fusion (with a fake text vector) -> head: logits [B]."""
    from .plugins import make_registry
    from .recipe import structure

    builtins = registry or make_registry(load_entrypoints=False)
    logits = []
    poolings = ["mean", "attention"] + (["cls"] if encoder.has_cls_token else [])
    for pooling_name in poolings:
        reg = builtins.get("pooling", pooling_name)
        pooling = reg.factory(structure({}, reg.params_cls, source="<check>"), encoder.out_dim, encoder.has_cls_token)
        pooled = pooling(out.tokens.float(), out.mask)
        assert pooled.shape == (out.tokens.shape[0], encoder.out_dim), (
            f"pooling {pooling_name!r} gave {tuple(pooled.shape)}"
        )
        reg = builtins.get("fusion", "gated")
        fusion = reg.factory(structure({"dim": 16}, reg.params_cls, source="<check>"), encoder.out_dim, 8)
        text = torch.randn(pooled.shape[0], 8)
        reg = builtins.get("head", "mlp")
        head = reg.factory(structure({"hidden": [8]}, reg.params_cls, source="<check>"), fusion.out_dim)
        logits.append(head(fusion(pooled, text)))
    return logits


def check_vision_encoder(name, params=None, registry=None):
    """Build ``name`` with ``params`` (use tiny/random sizes) and check the vision contract.

    Checks: it is a VisionEncoder; preprocessing is picklable and runs on PIL images of
    different shapes; the output is TokenOutput with tokens [2, N, out_dim] and a bool mask
    [2, N] with real tokens in every row; finite values; a batch of 2 gives each image the
    same pooled features as that image alone (padding is masked); every pooling + fusion +
    head runs; gradients reach the last block; blocks() are submodules; LoRA targets exist in
    the blocks; the identity string is stable across builds. Returns the encoder.
    """
    encoder = build("vision", name, params, registry)
    assert isinstance(encoder, VisionEncoder), f"{name}: factory must return a VisionEncoder"
    assert isinstance(encoder.out_dim, int) and encoder.out_dim > 0, f"{name}: out_dim must be a positive int"
    prep = encoder.preprocessing
    pickle.loads(pickle.dumps(prep))  # runs in DataLoader workers
    images = sample_images()
    items = [prep(image) for image in images]
    batch = prep.collate(items)
    encoder.eval()
    with torch.no_grad():
        out = encoder(**batch)
    assert isinstance(out, TokenOutput), f"{name}: forward must return TokenOutput(tokens, mask)"
    tokens, mask = out
    assert tokens.dim() == 3 and tokens.shape[0] == 2 and tokens.shape[2] == encoder.out_dim, (
        f"{name}: tokens must be [2, N, {encoder.out_dim}] (got {tuple(tokens.shape)})"
    )
    assert mask.dtype == torch.bool and mask.shape == tokens.shape[:2], (
        f"{name}: mask must be bool [2, {tokens.shape[1]}] (got {mask.dtype} {tuple(mask.shape)})"
    )
    assert mask.any(dim=1).all(), f"{name}: every image needs at least one real token"
    assert torch.isfinite(tokens[mask]).all(), f"{name}: non-finite tokens"
    if encoder.has_cls_token:
        assert mask[:, 0].all(), f"{name}: has_cls_token but token 0 is masked"

    # padding must not leak: each image alone gives the same masked mean as in the batch
    with torch.no_grad():
        for i, item in enumerate(items):
            alone = encoder(**prep.collate([item]))
            a = _masked_mean(alone.tokens, alone.mask)[0]
            b = _masked_mean(tokens, mask)[i]
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (
                f"{name}: image {i} alone and in a batch give different features "
                f"(max diff {float((a - b).abs().max()):.2e}); is padding masked?"
            )

    blocks = encoder.blocks()
    assert blocks, f"{name}: blocks() must list the encoder's blocks (top-N fine-tuning, LoRA)"
    own = {id(m) for m in encoder.modules()}
    assert all(id(b) in own for b in blocks), f"{name}: blocks() must be submodules of the encoder"
    if encoder.lora_target_modules:
        in_blocks = {n.rsplit(".", 1)[-1] for block in blocks for n, _ in block.named_modules()}
        missing = set(encoder.lora_target_modules) - in_blocks
        assert not missing, f"{name}: lora_target_modules {sorted(missing)} not found in blocks()"

    encoder.train()
    for p in encoder.parameters():
        p.requires_grad_(True)
    out = encoder(**batch)
    logits = _pipeline(encoder, out, None)
    for value in logits:
        assert value.shape == (2,) and torch.isfinite(value).all(), f"{name}: pipeline gave bad logits"
    sum(v.sum() for v in logits).backward()
    last = [p for p in blocks[-1].parameters() if p.requires_grad]
    assert last and any(p.grad is not None and p.grad.abs().sum() > 0 for p in last), (
        f"{name}: no gradient reaches the last block"
    )
    identity = encoder.identity
    assert isinstance(identity, str) and name in identity, f"{name}: identity must be a string naming the encoder"
    again = build("vision", name, params, registry)
    assert again.identity == identity, f"{name}: identity is not stable across builds"
    encoder.eval()
    return encoder


def check_text_encoder(name, params=None, registry=None):
    """Build ``name`` and check the text contract: [2, out_dim], finite, no grad, batch-invariant.

    Empty strings must work (OCR text is often empty). Returns the encoder.
    """
    encoder = build("text", name, params, registry)
    assert isinstance(encoder, TextEncoder), f"{name}: factory must return a TextEncoder"
    assert isinstance(encoder.out_dim, int) and encoder.out_dim > 0, f"{name}: out_dim must be a positive int"
    encoder.eval()
    texts = ["50% OFF all shoes today — shop now", ""]
    out = encoder(texts)
    assert out.shape == (2, encoder.out_dim), f"{name}: expected [2, {encoder.out_dim}] (got {tuple(out.shape)})"
    assert torch.isfinite(out).all(), f"{name}: non-finite embedding"
    assert not out.requires_grad, f"{name}: embeddings must be computed without gradients"
    for i, text in enumerate(texts):
        alone = encoder([text])[0]
        assert torch.allclose(alone, out[i], atol=1e-4), f"{name}: text {i} alone differs from in a batch"
    identity = encoder.identity
    assert isinstance(identity, str) and name in identity, f"{name}: identity must be a string naming the encoder"
    assert build("text", name, params, registry).identity == identity, f"{name}: identity is not stable"
    return encoder


def _masked_mean(tokens, mask):
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
