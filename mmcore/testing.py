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

from mmcore.interfaces import TextEncoder, TokenOutput, VisionEncoder
from mmcore.kit.health import feature_problem
from mmcore.model.trainability import LoraConfig, apply_trainability, lora_target_names
from mmcore.plugins import get_registry, make_registry
from mmcore.plugins.build import vision_traits_problem
from mmcore.plugins.registry import exception_line
from mmcore.recipe.convert import structure

__all__ = [
    "get_registry",
    "make_registry",
    "structure",
    "LoraConfig",
    "apply_trainability",
    "lora_target_names",
    "check_vision_encoder",
    "check_text_encoder",
    "check_pooling",
    "check_fusion",
    "check_head",
    "check_loss",
    "check_scheduler",
    "check_augmentation",
    "check_ocr_engine",
    "build",
    "sample_images",
    "encode_samples",
    "feature_problem",
]


#: what a dead-encoder failure suggests
DEAD_HINT = (
    "the encoder is dead: check its weights, and that random builds (tiny, pretrained = false) give varied "
    "features (BatchNorm CNNs: mmcore.calibrate_batchnorm)"
)
#: distinct, non-empty texts the text check embeds (their features must differ)
DISTINCT_TEXTS = ["50% OFF all shoes today — shop now", "grandma's apple pie, step by step", "Call 555-0100 for a free quote"]


def build(kind, name, params=None, registry=None):
    """Build a registered component from a params dict, as a recipe would."""
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe.convert import structure

    registry = registry or get_registry()
    registration = registry.get(kind, name)
    structured = structure(dict(params or {}), registration.params_cls, source=f"<{name} params>", path="params")
    return registration.factory(structured)


def _registered(kind, name, params, registry):
    """The registration of ``name`` and its params structured as a recipe would."""
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe.convert import structure

    registration = (registry or get_registry()).get(kind, name)
    structured = structure(dict(params or {}), registration.params_cls, source=f"<{name} params>", path="params")
    return registration, structured


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


def encode_samples(encoder):
    """``encoder`` (in eval mode) on :func:`sample_images` through its own preprocessing -> TokenOutput."""
    prep = encoder.preprocessing
    return encoder.eval()(**prep.collate([prep(image) for image in sample_images()]))


def _pipeline(encoder, out, registry):
    """tokens -> pooling -> fusion (with a fake text vector) -> head: logits [B]."""
    from mmcore.plugins.manager import make_registry
    from mmcore.recipe.convert import structure

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
        logits.append(head(fusion(pooled, text).fused))
    return logits


def check_vision_encoder(name, params=None, registry=None):
    """Build ``name`` with ``params`` (use tiny/random sizes) and check the vision contract.

    Checks: it is a VisionEncoder; preprocessing is picklable and runs on PIL images of
    different shapes; the output is TokenOutput with tokens [2, N, out_dim] and a bool mask
    [2, N] with real tokens in every row; finite values that are neither near zero nor the
    same for both images (a dead encoder); a batch of 2 gives each image the same pooled
    features as that image alone (padding is masked); every pooling + fusion + head runs;
    gradients reach the last block, one optimizer step changes it and the features stay
    finite; blocks() are submodules; LoRA targets exist in
    the blocks; the identity string is stable across builds; ``has_cls_token`` and ``trainable``
    agree with the :class:`~mmcore.VisionTraits` it registered. A fixed feature extractor
    (``trainable = False``) must have no parameters instead, and give the same output on every
    build. Returns the encoder.
    """
    registration, structured = _registered("vision", name, params, registry)
    encoder = registration.factory(structured)
    assert isinstance(encoder, VisionEncoder), f"{name}: factory must return a VisionEncoder"
    problem = vision_traits_problem(registration.traits_for(structured), encoder)
    assert problem is None, f"{name}: {problem}"
    assert isinstance(encoder.out_dim, int) and encoder.out_dim > 0, f"{name}: out_dim must be a positive int"
    prep = encoder.preprocessing
    pickle.loads(pickle.dumps(prep))  # runs in DataLoader workers
    assert _stored_as_data(prep, "vision", name, registry) == prep, f"{name}: the preprocessing rebuilt from a bundle differs"
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
    problem = feature_problem(_masked_mean(tokens, mask), inputs="images")
    assert problem is None, f"{name}: vision features are {problem}; {DEAD_HINT}"
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

    if not encoder.trainable:
        _check_fixed_extractor(name, encoder, batch, params, registry)
        return encoder
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
    # one optimizer step: the encoder trains (the weights that got gradients move)
    before = [p.detach().clone() for p in last]
    torch.optim.SGD(encoder.parameters(), lr=0.1).step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, last)), f"{name}: a training step changed nothing"
    with torch.no_grad():
        stepped = encoder(**batch)
    problem = feature_problem(_masked_mean(stepped.tokens, stepped.mask), inputs="images")
    assert problem is None or not problem.startswith("not finite"), f"{name}: after one training step, vision features are {problem}"
    _check_identity(name, encoder, params, registry)
    encoder.eval()
    return encoder


def _check_identity(name, encoder, params, registry):
    """The identity names the encoder and is the same on another build; returns that build."""
    identity = encoder.identity
    assert isinstance(identity, str) and name in identity, f"{name}: identity must be a string naming the encoder"
    again = build("vision", name, params, registry)
    assert again.identity == identity, f"{name}: identity is not stable across builds"
    return again


def _check_fixed_extractor(name, encoder, batch, params, registry):
    """``trainable = False``: no parameters, every pooling + fusion + head still trains on it."""
    assert not any(True for _ in encoder.parameters()), (
        f"{name}: trainable = False, but the encoder has parameters (a fixed feature extractor has none)"
    )
    with torch.no_grad():
        out = encoder(**batch)
    logits = _pipeline(encoder, out, None)
    for value in logits:
        assert value.shape == (2,) and torch.isfinite(value).all(), f"{name}: pipeline gave bad logits"
    again = _check_identity(name, encoder, params, registry)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).tokens, out.tokens, msg=f"{name}: a fixed extractor must give the same output on every build")


def check_text_encoder(name, params=None, registry=None):
    """Build ``name`` and check the text contract: [2, out_dim], finite, no grad, batch-invariant,
    distinct texts give features that are neither near zero nor all the same (a dead encoder).

    Empty strings must work (OCR text is often empty). An encoder with ``host_features()`` must
    split exactly: ``encode == encode_features(featurizer(texts))``, the featurizer rebuilt from
    its JSON fields giving the same arrays. Returns the encoder.
    """
    encoder = build("text", name, params, registry)
    assert isinstance(encoder, TextEncoder), f"{name}: factory must return a TextEncoder"
    assert isinstance(encoder.out_dim, int) and encoder.out_dim > 0, f"{name}: out_dim must be a positive int"
    encoder.eval()
    texts = ["50% OFF all shoes today — shop now", ""]
    fit_texts = [*texts, "grandma's birthday photos", "cheap meds, no prescription"]
    if encoder.fits_on_train:  # fitted on the training split before a run encodes anything
        encoder.fit(fit_texts)
    out = encoder(texts)
    assert out.shape == (2, encoder.out_dim), f"{name}: expected [2, {encoder.out_dim}] (got {tuple(out.shape)})"
    assert torch.isfinite(out).all(), f"{name}: non-finite embedding"
    assert not out.requires_grad, f"{name}: embeddings must be computed without gradients"
    for i, text in enumerate(texts):
        alone = encoder([text])[0]
        assert torch.allclose(alone, out[i], atol=1e-4), f"{name}: text {i} alone differs from in a batch"
    problem = feature_problem(encoder(DISTINCT_TEXTS), inputs="texts")
    assert problem is None, f"{name}: text features are {problem}; {DEAD_HINT}"
    _check_host_featurizer(name, encoder, texts, registry)
    identity = encoder.identity
    assert isinstance(identity, str) and name in identity, f"{name}: identity must be a string naming the encoder"
    again = build("text", name, params, registry)
    if again.fits_on_train:
        again.fit(fit_texts)
    assert again.identity == identity, f"{name}: identity is not stable"
    return encoder


def _stored_as_data(obj, kind, name, registry):
    """``obj`` through an export bundle's JSON and back: its class must be one the component (or the
    core) declares (``register(..., data_classes=(...))``), its fields plain JSON data."""
    import json

    from mmcore.errors import MmcoreError
    from mmcore.export.bundle import describe_object, rebuild_object
    from mmcore.plugins.manager import get_registry

    registry = registry or get_registry()
    try:
        described = json.loads(json.dumps(describe_object(obj, registry, kind=kind, component=name), allow_nan=False))
        return rebuild_object(described, registry, source=name, what=type(obj).__name__)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{name}: the fields of {type(obj).__name__} must be plain JSON data ({exc})") from None
    except MmcoreError as exc:
        raise AssertionError(str(exc)) from None


def _check_host_featurizer(name, encoder, texts, registry):
    """When the encoder offers ``host_features()`` (export without a tokenizer): named float32 arrays,
    a featurizer that survives the bundle's JSON round trip, and ``encode == encode_features(featurizer(texts))``."""
    import attrs

    featurizer = encoder.host_features()
    if featurizer is None:
        return
    assert attrs.has(type(featurizer)), f"{name}: host_features() must return an attrs object (a bundle stores its fields)"
    arrays = featurizer(texts)
    assert set(arrays) == set(featurizer.names), f"{name}: the featurizer gives {sorted(arrays)}, its names say {list(featurizer.names)}"
    for key, array in arrays.items():
        assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == 2 and len(array) == len(texts), (
            f"{name}: featurizer array {key!r} must be float32 [B, n] (got {type(array).__name__} "
            f"{getattr(array, 'dtype', '')} {getattr(array, 'shape', '')})")
    again = _stored_as_data(featurizer, "text", name, registry)(texts)
    for key, array in arrays.items():
        assert np.array_equal(again[key], array), f"{name}: the featurizer rebuilt from its fields gives another {key!r}"
    tensors = {key: torch.from_numpy(array).to(encoder.device) for key, array in arrays.items()}
    with torch.no_grad():
        split = encoder.encode_features(**tensors).float()
    _same(split, encoder(texts), f"{name}: encode must equal encode_features(host_features()(texts))")


def _masked_mean(tokens, mask):
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


# --- the other component kinds -----------------------------------------------------------


def _same(a, b, what):
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), f"{what} (max diff {float((a - b).abs().max()):.2e})"


def check_pooling(name, params=None, registry=None, *, dim=8, has_cls_token=False):
    """Build pooling ``name`` for ``dim``-wide tokens and check its contract on what the engine sends.

    The engine sends float32 tokens with a padding mask (sequences of several lengths), and
    float16 tokens with ``mask=None`` (cached token sequences of one length: every token is
    real), see :class:`mmcore.Pooling`. Checks: an ``nn.Module`` giving [B, dim] finite vectors;
    padded tokens (mask False) never change the result, whatever they hold; each sample alone
    gives what it gives in a batch; ``mask=None`` gives what an all-True mask gives; float16
    tokens without a mask work and give what the same values in float32 give, to float16
    precision; gradients reach the tokens (and the pooling's parameters, when it has any).
    Returns the module.
    """
    registration, structured = _registered("pooling", name, params, registry)
    pooling = registration.factory(structured, dim, has_cls_token)
    assert isinstance(pooling, torch.nn.Module), f"{name}: factory must return an nn.Module (an mmcore.Pooling)"
    pooling.eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, dim, generator=generator)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = _pool(name, pooling, tokens, mask, "float32 tokens with a padding mask")
    assert out.shape == (2, dim), f"{name}: expected [2, {dim}] (got {tuple(out.shape)})"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    garbage = tokens.clone()
    garbage[1, 3:] = 1e4
    _same(pooling(garbage, mask), out, f"{name}: padded tokens change the result; is the mask applied?")
    alone = pooling(tokens[1:, :3], mask[1:, :3])[0]
    _same(alone, out[1], f"{name}: a padded sample alone differs from in a batch")
    _same(pooling(tokens[:1], mask[:1])[0], out[0], f"{name}: sample 0 alone differs from in a batch")
    full = torch.ones(2, 5, dtype=torch.bool)
    unmasked = _pool(name, pooling, tokens, None, "mask=None (every token is real)")
    _same(unmasked, pooling(tokens, full), f"{name}: mask=None must mean every token is real (as an all-True mask)")
    half = tokens.half()
    cached = _pool(name, pooling, half, None, "float16 tokens with mask=None, as cached tokens of one length arrive")
    assert cached.shape == (2, dim) and torch.isfinite(cached).all(), f"{name}: float16 tokens gave a bad output"
    reference = pooling(half.float(), None)
    assert torch.allclose(cached.float(), reference, atol=1e-2, rtol=1e-2), (
        f"{name}: float16 tokens give another result than the same values in float32 "
        f"(max diff {float((cached.float() - reference).abs().max()):.2e})"
    )
    pooling.train()
    leaf = tokens.clone().requires_grad_(True)
    pooling(leaf, mask).sum().backward()
    assert leaf.grad is not None and leaf.grad[:, 0].abs().sum() > 0, f"{name}: no gradient reaches the tokens"
    params = [p for p in pooling.parameters() if p.requires_grad]
    assert not params or any(p.grad is not None for p in params), f"{name}: no gradient reaches its parameters"
    pooling.eval()
    return pooling


def _pool(name, pooling, tokens, mask, what):
    """``pooling(tokens, mask)``; a crash is an AssertionError saying which input the engine sends broke it."""
    try:
        return pooling(tokens, mask)
    except Exception as exc:  # whatever the plugin raises: say which of the engine's inputs it cannot take
        raise AssertionError(f"{name}: fails on {what}: {exception_line(exc)}") from exc


def _check_batch_module(name, module, inputs, out_shape):
    """Shape, finiteness, batch invariance and gradients of a module over batch-first inputs."""
    module.eval()
    out = module(*inputs)
    assert out.shape == out_shape, f"{name}: expected {list(out_shape)} (got {list(out.shape)})"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    alone = module(*(x[:1] for x in inputs))
    _same(alone[0], out[0], f"{name}: sample 0 alone differs from in a batch")
    module.train()
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    module(*leaves).sum().backward()
    for i, leaf in enumerate(leaves):
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, f"{name}: no gradient reaches input {i}"
    params = [p for p in module.parameters() if p.requires_grad]
    assert not params or any(p.grad is not None for p in params), f"{name}: no gradient reaches its parameters"
    module.eval()
    return out


def check_fusion(name, params=None, registry=None, *, vision_dim=8, text_dim=6):
    """Build fusion ``name`` and check: an :class:`mmcore.Fusion` with a positive int ``out_dim``
    whose forward maps (vision [B, vision_dim], text [B, text_dim]) to a :class:`mmcore.FusionOutput`
    with finite ``fused`` [B, out_dim]; batch invariant; the gradient reaches both modalities (a
    fusion that ignores one is broken); ``aux_logits``, when given, a non-negative weight and
    logits [B] each; ``gate``, when given, [B] or [B, k] in [0, 1]. A plain module returning the
    fused tensor (the protocol before :class:`mmcore.Fusion`) still passes. Returns the module."""
    from mmcore.interfaces import AuxiliaryLogits, Fusion, FusionOutput

    registration, structured = _registered("fusion", name, params, registry)
    fusion = registration.factory(structured, vision_dim, text_dim)
    assert isinstance(fusion, torch.nn.Module), f"{name}: factory must return an nn.Module (an mmcore.Fusion)"
    out_dim = getattr(fusion, "out_dim", None)
    assert isinstance(out_dim, int) and out_dim > 0, f"{name}: the module needs a positive int out_dim"
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, vision_dim, generator=generator), torch.randn(2, text_dim, generator=generator))
    if not isinstance(fusion, Fusion):
        _check_batch_module(name, fusion, inputs, (2, out_dim))
        return fusion
    for training in (False, True):
        out = fusion.train(training)(*inputs)
        assert isinstance(out, FusionOutput), f"{name}: forward must return mmcore.FusionOutput (got {type(out).__name__})"
        if out.aux_logits is not None:
            aux = out.aux_logits
            assert isinstance(aux, AuxiliaryLogits) and aux.weight >= 0, f"{name}: aux_logits must be AuxiliaryLogits(weight >= 0, logits)"
            assert all(logit.shape == (2,) for logit in aux.logits), f"{name}: each auxiliary logit must be [B]"
        if out.gate is not None:
            gate = out.gate.float()
            assert gate.shape[0] == 2 and gate.dim() <= 2 and bool(((gate >= 0) & (gate <= 1)).all()), (
                f"{name}: gate must be [B] or [B, k] in [0, 1] (got {tuple(gate.shape)})"
            )
    _check_batch_module(name, _Fused(fusion), inputs, (2, out_dim))
    return fusion


class _Fused(torch.nn.Module):
    """A fusion as a batch module: its ``fused`` tensor, plus in training its auxiliary logits,
    through which its inputs may learn (late fusion detaches the fused logits from the head's loss)."""

    def __init__(self, fusion):
        super().__init__()
        self.fusion = fusion

    def forward(self, vision, text):
        out = self.fusion(vision, text)
        if out.aux_logits is None:
            return out.fused
        return out.fused + sum(out.aux_logits.logits).unsqueeze(-1)


def check_head(name, params=None, registry=None, *, in_dim=8):
    """Build head ``name`` and check: features [B, in_dim] -> finite logits [B] (one per sample,
    not [B, 1]); batch invariant; gradients reach the features and its parameters."""
    registration, structured = _registered("head", name, params, registry)
    head = registration.factory(structured, in_dim)
    assert isinstance(head, torch.nn.Module), f"{name}: factory must return an nn.Module"
    features = torch.randn(2, in_dim, generator=torch.Generator().manual_seed(0))
    _check_batch_module(name, head, (features,), (2,))
    return head


def check_loss(name, params=None, registry=None, *, label_counts=(6, 2)):
    """Build loss ``name`` for ``label_counts`` (negatives, positives) and check: (logits [B],
    float targets [B]) -> a finite scalar with a finite gradient; confident right answers cost
    less than confident wrong ones. Returns the module."""
    registration, structured = _registered("loss", name, params, registry)
    loss_fn = registration.factory(structured, label_counts)
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    logits = torch.tensor([0.3, -0.2, -0.5, 0.8], requires_grad=True)
    loss = loss_fn(logits, targets)
    assert loss.dim() == 0, f"{name}: must return a scalar (got shape {tuple(loss.shape)})"
    assert torch.isfinite(loss), f"{name}: non-finite loss"
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all(), f"{name}: bad gradient"
    with torch.no_grad():
        right = loss_fn(4 * (2 * targets - 1), targets)
        wrong = loss_fn(-4 * (2 * targets - 1), targets)
    assert right < wrong, f"{name}: right answers cost {float(right):.4g}, wrong ones {float(wrong):.4g}"
    return loss_fn


def check_scheduler(name, params=None, registry=None, *, total_steps=20):
    """Build schedule ``name`` over ``total_steps`` and check: an ``LRScheduler`` giving finite,
    non-negative rates for every step, and a ``state_dict()`` that resumes it exactly (runs
    resume from last.ckpt). Returns the learning rates of the steps."""
    registration, structured = _registered("scheduler", name, params, registry)

    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return optimizer, registration.factory(structured, optimizer, total_steps)

    optimizer, scheduler = make()
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler), (
        f"{name}: factory must return an LRScheduler"
    )
    rates = []
    half = None
    for step in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if step == total_steps // 2:
            half = (scheduler.state_dict(), list(rates))
    assert all(np.isfinite(r) and r >= 0 for r in rates), f"{name}: bad learning rates {rates}"
    optimizer, resumed = make()
    resumed.load_state_dict(half[0])
    optimizer.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    again = list(half[1])
    for _ in range(total_steps // 2 + 1, total_steps):
        again.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        resumed.step()
    assert np.allclose(again, rates), f"{name}: a resumed schedule gives other rates ({again} vs {rates})"
    return rates


def check_augmentation(name, params=None, registry=None):
    """Build augmentation ``name`` and check: ``None`` (no augmentation) or a picklable callable
    turning a PIL RGB image into a PIL RGB image (of the same size, when it registered
    ``keeps_size``); the same torch seed gives the same image (loader workers seed torch).
    Returns the augmentation."""
    from PIL import Image

    registration, structured = _registered("augmentation", name, params, registry)
    augmentation = registration.factory(structured)
    if augmentation is None:
        return None
    traits = registration.traits_for(structured)
    augmentation = pickle.loads(pickle.dumps(augmentation))  # runs in DataLoader workers
    for image in sample_images():
        outputs = []
        for _ in range(2):
            torch.manual_seed(7)
            out = augmentation(image)
            assert isinstance(out, Image.Image) and out.mode == "RGB", f"{name}: must return an RGB PIL image"
            if traits is not None and traits.keeps_size:
                assert out.size == image.size, (
                    f"{name}: registered with keeps_size=True, but a {image.size} image became {out.size}"
                )
            outputs.append(np.asarray(out))
        assert np.array_equal(*outputs), f"{name}: the same torch seed gave different images; use torch's RNG"
    return augmentation


def check_ocr_engine(name, params=None, registry=None, *, lang="eng", image=None, expected=None):
    """Build OCR engine ``name`` and check: an :class:`~mmcore.interfaces.OcrEngine` with a
    stable identity naming it; ``read(image, lang)`` returns a string (``image`` defaults to a
    blank one; with ``expected``, that text must appear, case and spacing ignored). Needs the
    engine's program and language installed: skip the test where they are not. Returns the engine."""
    from PIL import Image

    from mmcore.interfaces import OcrEngine

    registration, structured = _registered("ocr", name, params, registry)
    engine = registration.factory(structured)
    assert isinstance(engine, OcrEngine), f"{name}: factory must return an OcrEngine"
    identity = engine.identity
    assert isinstance(identity, str) and name in identity, f"{name}: identity must be a string naming the engine"
    assert registration.factory(structured).identity == identity, f"{name}: identity is not stable"
    check = getattr(engine, "check", None)
    if check is not None:
        check(lang)
    image = image if image is not None else Image.new("RGB", (64, 32), "white")
    text = engine.read(image, lang)
    assert isinstance(text, str), f"{name}: read() must return a str (got {type(text).__name__})"
    if expected is not None:
        squash = "".join(text.lower().split())
        assert "".join(expected.lower().split()) in squash, f"{name}: expected {expected!r} in {text!r}"
    return engine
