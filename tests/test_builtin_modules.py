"""Built-in poolings, fusions, heads and the unimodal projection, against hand computations."""

import pytest
import torch
import torch.nn.functional as F

from mmcore.builtin.projection import UnimodalProjection
from mmcore.engine.features import pooling_trains
from mmcore.interfaces import Fusion, FusionOutput, Pooling
from mmcore.plugins.manager import make_registry
from mmcore.validators import FieldError


@pytest.fixture(scope="module")
def registry():
    return make_registry(load_entrypoints=False)


def build(registry, kind, name, *args, **params):
    registration = registry.get(kind, name)
    return registration.factory(registration.params_cls(**params), *args)


def padded_batch(dim=8, lengths=(5, 3, 1), n=6, seed=0):
    """Tokens [B, n, dim] with ``lengths`` real tokens each; padding holds huge values."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(lengths), n, dim, generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for i, length in enumerate(lengths):
        mask[i, :length] = True
    tokens[~mask] = 1e4
    return tokens, mask


# --- contract: every registered component builds from defaults, right shape, finite ---------


@pytest.mark.parametrize("name", ["mean", "cls", "attention"])
def test_pooling_contract(registry, name):
    tokens, mask = padded_batch(dim=16, lengths=(6, 2))
    pooling = build(registry, "pooling", name, 16, True).eval()
    out = pooling(tokens, mask)
    assert out.shape == (2, 16)
    assert torch.isfinite(out).all()
    assert isinstance(pooling, Pooling)
    # what the feature cache stores follows the parameters: tokens for attention, vectors otherwise
    assert pooling_trains(pooling) == (name == "attention")


@pytest.mark.parametrize("name", ["gated", "concat", "late"])
def test_fusion_contract(registry, name):
    fusion = build(registry, "fusion", name, 12, 7).eval()
    out = fusion(torch.randn(2, 12), torch.randn(2, 7))
    assert isinstance(fusion, Fusion) and isinstance(out, FusionOutput) and out.aux_logits is None
    assert out.fused.shape == (2, fusion.out_dim)
    assert torch.isfinite(out.fused).all()


def test_every_builtin_pooling_fusion_head_is_tested(registry):
    assert registry.names("pooling") == ["attention", "cls", "mean"]
    assert registry.names("fusion") == ["concat", "gated", "late"]
    assert registry.names("head") == ["mlp"]


# --- pooling -----------------------------------------------------------------------------


def test_mean_pooling_matches_loop_over_real_tokens(registry):
    tokens, mask = padded_batch()
    tokens[1, 4] = float("nan")  # even NaN in a padded slot must not leak
    pooling = build(registry, "pooling", "mean", 8, False)
    out = pooling(tokens, mask)
    for i in range(tokens.shape[0]):
        real = [tokens[i, j] for j in range(tokens.shape[1]) if mask[i, j]]
        expected = sum(real) / len(real)
        torch.testing.assert_close(out[i], expected)
    assert not pooling_trains(pooling)


def test_mean_pooling_without_mask_is_plain_mean(registry):
    tokens = torch.randn(2, 4, 8)
    pooling = build(registry, "pooling", "mean", 8, False)
    torch.testing.assert_close(pooling(tokens, None), tokens.mean(dim=1))


def test_mean_pooling_can_skip_the_cls_token(registry):
    tokens, mask = padded_batch(lengths=(5, 3))
    pooling = build(registry, "pooling", "mean", 8, True, skip_cls_token=True)
    torch.testing.assert_close(pooling(tokens, mask)[0], tokens[0, 1:5].mean(dim=0))
    torch.testing.assert_close(pooling(tokens, mask)[1], tokens[1, 1:3].mean(dim=0))
    # without a CLS token there is nothing to skip
    plain = build(registry, "pooling", "mean", 8, False, skip_cls_token=True)
    torch.testing.assert_close(plain(tokens, mask)[0], tokens[0, :5].mean(dim=0))


def test_cls_pooling_takes_the_first_token(registry):
    tokens, mask = padded_batch()
    pooling = build(registry, "pooling", "cls", 8, True)
    assert torch.equal(pooling(tokens, mask), tokens[:, 0])
    assert not pooling_trains(pooling)


def test_cls_pooling_refuses_an_encoder_without_cls_token(registry):
    with pytest.raises(ValueError) as info:
        build(registry, "pooling", "cls", 8, False)
    assert str(info.value) == (
        "pooling 'cls' needs an encoder with a CLS token; this encoder has none "
        "— use mean or attention"
    )


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_pooling_ignores_padding(registry, heads):
    torch.manual_seed(0)
    pooling = build(registry, "pooling", "attention", 8, False, heads=heads).eval()
    assert pooling_trains(pooling)
    tokens, mask = padded_batch()
    out = pooling(tokens, mask)

    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    changed[2, 3] = float("inf")
    torch.testing.assert_close(pooling(changed, mask), out)

    # each sample equals the same sample without its padding
    for i, length in enumerate(mask.sum(dim=1).tolist()):
        alone = pooling(tokens[i : i + 1, :length], torch.ones(1, length, dtype=torch.bool))
        torch.testing.assert_close(alone[0], out[i], rtol=1e-5, atol=1e-6)

    # ...but real tokens do matter
    moved = tokens.clone()
    moved[0, 0] += 1.0
    assert not torch.allclose(pooling(moved, mask)[0], out[0])


def test_attention_pooling_is_a_weighted_average_of_value_projections(registry):
    """One head: out = out_proj(softmax(q k^T / sqrt(d)) v) over the real tokens only."""
    torch.manual_seed(1)
    pooling = build(registry, "pooling", "attention", 8, False).eval()
    tokens, mask = padded_batch(lengths=(4, 2))
    attn = pooling.attention
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    out = pooling(tokens, mask)
    for i, length in enumerate((4, 2)):
        x = tokens[i, :length]
        q = pooling.query[0, 0] @ w_q.T + b_q
        k = x @ w_k.T + b_k
        v = x @ w_v.T + b_v
        weights = torch.softmax(k @ q / 8**0.5, dim=0)
        expected = attn.out_proj(weights @ v)
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-6)


def test_attention_pooling_trains_and_survives_an_empty_sample(registry):
    pooling = build(registry, "pooling", "attention", 8, False)
    tokens, mask = padded_batch(lengths=(3, 0))
    out = pooling(tokens, mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert pooling.query.grad is not None and pooling.query.grad.abs().sum() > 0


def test_attention_pooling_params_are_validated(registry):
    params_cls = registry.get("pooling", "attention").params_cls
    with pytest.raises(FieldError, match=r"^must be >= 1 \(got 0\)$"):
        params_cls(heads=0)
    with pytest.raises(FieldError, match=r"^must be in \[0.0, 1.0\) \(got 1.5\)$"):
        params_cls(dropout=1.5)
    message = r"heads must divide the token dimension 8 \(got heads = 3\)"
    with pytest.raises(ValueError, match=message):
        build(registry, "pooling", "attention", 8, False, heads=3)


# --- fusion ------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_gated_fusion_is_the_gmu_formula(registry, bias):
    torch.manual_seed(0)
    fusion = build(registry, "fusion", "gated", 6, 4, dim=5, bias=bias)
    assert fusion.out_dim == 5
    x_v, x_t = torch.randn(3, 6), torch.randn(3, 4)
    out = fusion(x_v, x_t)

    def affine(linear, x):
        y = x @ linear.weight.T
        return y + linear.bias if bias else y

    assert (fusion.vision.bias is not None) == bias
    h_v = torch.tanh(affine(fusion.vision, x_v))
    h_t = torch.tanh(affine(fusion.text, x_t))
    z = torch.sigmoid(affine(fusion.gate, torch.cat([x_v, x_t], dim=1)))
    torch.testing.assert_close(out.fused, z * h_v + (1 - z) * h_t)
    torch.testing.assert_close(out.gate, z)  # the report's gate figure
    assert not out.gate.requires_grad and out.aux_logits is None


def test_gated_fusion_gate_selects_a_modality(registry):
    """A saturated gate passes one modality's tanh projection through unchanged."""
    fusion = build(registry, "fusion", "gated", 3, 3, dim=3)
    with torch.no_grad():
        fusion.gate.weight.zero_()
        fusion.gate.bias.fill_(50.0)
    x_v, x_t = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(fusion(x_v, x_t).fused, torch.tanh(fusion.vision(x_v)))
    with torch.no_grad():
        fusion.gate.bias.fill_(-50.0)
    torch.testing.assert_close(fusion(x_v, x_t).fused, torch.tanh(fusion.text(x_t)))


def test_gated_fusion_params_are_validated(registry):
    with pytest.raises(FieldError, match=r"^must be > 0 \(got 0\)$"):
        registry.get("fusion", "gated").params_cls(dim=0)


def test_concat_fusion_normalizes_then_concatenates(registry):
    fusion = build(registry, "fusion", "concat", 6, 4)
    assert fusion.out_dim == 10
    assert list(fusion.parameters()) == []
    x_v, x_t = torch.randn(3, 6) * 7, torch.randn(3, 4) * 0.1
    expected = torch.cat([F.normalize(x_v, dim=-1), F.normalize(x_t, dim=-1)], dim=-1)
    torch.testing.assert_close(fusion(x_v, x_t).fused, expected)
    # an all-zero text vector (no OCR text) stays zero instead of becoming NaN
    out = fusion(x_v, torch.zeros(3, 4)).fused
    assert torch.equal(out[:, 6:], torch.zeros(3, 4))


def test_late_fusion_scores_each_modality_with_its_own_head(registry):
    fusion = build(registry, "fusion", "late", 6, 4, hidden=(5,), aux_weight=0.5).eval()
    assert fusion.out_dim == 2
    x_v, x_t = torch.randn(3, 6) * 7, torch.randn(3, 4) * 0.1
    out = fusion(x_v, x_t)
    assert out.aux_logits is None and out.gate is None  # scoring: the two logits alone
    out = out.fused
    torch.testing.assert_close(out[:, 0], fusion.vision(F.normalize(x_v, dim=-1)))
    torch.testing.assert_close(out[:, 1], fusion.text(F.normalize(x_t, dim=-1)))
    # each logit sees its own modality only
    torch.testing.assert_close(fusion(x_v, torch.randn(3, 4)).fused[:, 0], out[:, 0])
    torch.testing.assert_close(fusion(torch.randn(3, 6), x_t).fused[:, 1], out[:, 1])


@pytest.mark.parametrize("detach", [True, False])
def test_late_fusion_returns_its_branch_logits_for_their_own_losses_in_training(registry, detach):
    fusion = build(registry, "fusion", "late", 6, 4, aux_weight=0.5, detach=detach).train()
    x_v, x_t = torch.randn(3, 6), torch.randn(3, 4)
    out = fusion(x_v, x_t)
    assert out.aux_logits.weight == 0.5
    image, text = out.aux_logits.logits
    torch.testing.assert_close(torch.stack([image, text], dim=-1), out.fused)
    assert image.requires_grad and out.fused.requires_grad is not detach  # detach: the head's loss stops here
    no_aux = build(registry, "fusion", "late", 6, 4, aux_weight=0.0, detach=False).train()
    assert no_aux(x_v, x_t).aux_logits is None


def test_late_fusion_starts_a_linear_head_as_the_plain_sum(registry):
    from mmcore.builtin.heads import MlpHead

    fusion = build(registry, "fusion", "late", 6, 4)
    head = MlpHead(2, hidden=())
    fusion.init_head(head)
    logits = torch.randn(5, 2)
    torch.testing.assert_close(head(logits), logits.sum(-1))
    deep = MlpHead(2, hidden=(3,))
    before = [p.clone() for p in deep.parameters()]
    fusion.init_head(deep)  # an MLP head keeps its own init
    assert all(torch.equal(a, b) for a, b in zip(before, deep.parameters()))


def test_late_fusion_params_are_validated(registry):
    params_cls = registry.get("fusion", "late").params_cls
    with pytest.raises(FieldError, match=r"^must be >= 0 \(got -1\.0\)$"):
        params_cls(aux_weight=-1.0)
    with pytest.raises(FieldError, match=r"^sizes must be > 0"):
        params_cls(hidden=(0,))


# --- head --------------------------------------------------------------------------------


def test_mlp_head_layers_and_output_shape(registry):
    head = build(registry, "head", "mlp", 10, hidden=(7, 5), dropout=0.2, activation="silu")
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 7), (7, 5), (5, 1)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in head.modules()) == 2
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in head.modules()) == 2
    out = head(torch.randn(4, 10))
    assert out.shape == (4,)


def test_mlp_head_without_hidden_layers_is_logistic_regression(registry):
    head = build(registry, "head", "mlp", 6, hidden=())
    x = torch.randn(3, 6)
    (linear,) = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    torch.testing.assert_close(head(x), (x @ linear.weight.T + linear.bias)[:, 0])


def test_mlp_head_default_matches_hand_forward(registry):
    head = build(registry, "head", "mlp", 6).eval()
    first, last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert first.out_features == 512
    x = torch.randn(3, 6)
    expected = F.gelu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias
    torch.testing.assert_close(head(x), expected[:, 0])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"activation": "swish"}, "must be one of gelu, relu, silu, tanh (got 'swish')"),
        ({"dropout": 1.0}, "must be in [0.0, 1.0) (got 1.0)"),
        ({"dropout": -0.1}, "must be in [0.0, 1.0) (got -0.1)"),
        ({"hidden": (64, 0)}, "sizes must be > 0 (got (64, 0))"),
    ],
)
def test_mlp_head_params_are_validated(registry, params, message):
    params_cls = registry.get("head", "mlp").params_cls
    with pytest.raises(FieldError) as info:
        params_cls(**params)
    assert str(info.value) == message
    assert info.value.field == next(iter(params))


# --- projection --------------------------------------------------------------------------


def test_projection_with_linear_then_l2():
    projection = UnimodalProjection(6, 4)
    assert projection.out_dim == 4
    x = torch.randn(3, 6)
    expected = F.normalize(x @ projection.linear.weight.T + projection.linear.bias, dim=-1)
    torch.testing.assert_close(projection(x), expected)
    torch.testing.assert_close(projection(x).norm(dim=-1), torch.ones(3))


def test_projection_without_linear_only_normalizes():
    projection = UnimodalProjection(6, None)
    assert projection.out_dim == 6
    assert list(projection.parameters()) == []
    x = torch.randn(3, 6)
    torch.testing.assert_close(projection(x), x / x.norm(dim=-1, keepdim=True))


def test_projection_rejects_a_bad_size():
    with pytest.raises(ValueError, match=r"projection size must be > 0 \(got -2\)"):
        UnimodalProjection(6, -2)


def test_attention_pooling_accepts_half_precision_cached_tokens(registry):
    torch.manual_seed(2)
    pooling = build(registry, "pooling", "attention", 8, False, heads=2).eval()
    tokens, mask = padded_batch()
    half = tokens.half()
    out = pooling(half, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pooling(half.float(), mask))
