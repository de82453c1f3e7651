"""Freezing, top-N fine-tuning, LoRA and optimizer groups, derived from an encoder's blocks."""

import pytest
import torch
from torch import nn

from mmcore.interfaces import NoParams, Preprocessing, TokenOutput, VisionEncoder
from mmcore.model.trainability import (
    LoraConfig,
    TrainabilityError,
    apply_trainability,
    freeze_norm_statistics,
    load_lora_state_dict,
    lora_state_dict,
    lora_target_names,
    parameter_groups,
    trainable_summary,
)
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import FieldError

DIM = 8
PATCH = 4


def linear_params(n_in, n_out):
    return n_in * n_out + n_out


class FakeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x):
        attn = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(1, 2), dim=-1)
        return self.norm(x + self.out(attn @ self.v_proj(x)))


BLOCK_PARAMS = 4 * linear_params(DIM, DIM) + 2 * DIM


class FakeEncoder(VisionEncoder):
    """4 attention-ish blocks over 4x4 patches of an 8x8 image."""

    name = "fake_vit"
    has_cls_token = False
    lora_target_modules = ("q_proj", "k_proj", "v_proj")

    def __init__(self):
        super().__init__()
        self.out_dim = DIM
        self.preprocessing = Preprocessing(size=(8, 8))
        self.embed = nn.Linear(3 * PATCH * PATCH, DIM)
        self.layers = nn.ModuleList(FakeBlock() for _ in range(4))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, pixel_values):
        b = pixel_values.shape[0]
        patches = pixel_values.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)
        x = self.embed(patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * PATCH * PATCH))
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return TokenOutput(x, torch.ones(x.shape[:2], dtype=torch.bool))

    def blocks(self):
        return list(self.layers)

    def final_norm(self):
        return self.norm


FAKE_TOTAL = linear_params(3 * PATCH * PATCH, DIM) + 4 * BLOCK_PARAMS + 2 * DIM

SIGLIP_HIDDEN, SIGLIP_MLP = 32, 64
SIGLIP_LAYER_PARAMS = (
    4 * linear_params(SIGLIP_HIDDEN, SIGLIP_HIDDEN)  # q, k, v, out_proj
    + linear_params(SIGLIP_HIDDEN, SIGLIP_MLP)
    + linear_params(SIGLIP_MLP, SIGLIP_HIDDEN)
    + 2 * 2 * SIGLIP_HIDDEN  # layer_norm1, layer_norm2
)


class TinySiglip(VisionEncoder):
    """A real transformers SigLIP vision tower (random weights) behind the mmcore interface."""

    name = "tiny_siglip"
    lora_target_modules = ("q_proj", "k_proj", "v_proj")

    def __init__(self):
        from transformers import SiglipVisionConfig, SiglipVisionModel

        super().__init__()
        config = SiglipVisionConfig(
            hidden_size=SIGLIP_HIDDEN,
            intermediate_size=SIGLIP_MLP,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            vision_use_head=False,  # an unused pooling head would never get gradients
        )
        self.model = SiglipVisionModel(config)
        self.out_dim = SIGLIP_HIDDEN
        self.preprocessing = Preprocessing(size=(32, 32))

    def _tower(self):
        # transformers 4 nests the tower under .vision_model; 5 does not
        return getattr(self.model, "vision_model", self.model)

    def forward(self, pixel_values):
        tokens = self.model(pixel_values=pixel_values).last_hidden_state
        return TokenOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))

    def blocks(self):
        return list(self._tower().encoder.layers)

    def final_norm(self):
        return self._tower().post_layernorm


ENCODERS = {
    "fake": (FakeEncoder, BLOCK_PARAMS, DIM, 3 * 8 * 8),
    "siglip": (TinySiglip, SIGLIP_LAYER_PARAMS, SIGLIP_HIDDEN, 3 * 32 * 32),
}


@pytest.fixture(params=sorted(ENCODERS))
def kind(request):
    return request.param


def build(kind, seed=0):
    torch.manual_seed(seed)
    return ENCODERS[kind][0]()


def pixels(kind, seed=1):
    side = 8 if kind == "fake" else 32
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))


def count(module, trainable=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def total(module):
    return sum(p.numel() for p in module.parameters())


class Classifier(nn.Module):
    """vision -> mean pooling -> head, the shape of mmcore's model for these tests."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision
        self.head = nn.Sequential(nn.Linear(vision.out_dim, 4), nn.LayerNorm(4), nn.Linear(4, 1))

    def forward(self, pixel_values):
        return self.head(self.vision(pixel_values=pixel_values).tokens.mean(1)).squeeze(-1)


NO_LORA = LoraConfig()


# -- freeze / top-N / all ------------------------------------------------------------------


def test_frozen_backbone_trains_nothing(kind):
    encoder = apply_trainability(build(kind), freeze_backbone=True, finetune_layers=0, lora=NO_LORA)
    assert count(encoder) == 0
    assert count(encoder, trainable=False) == total(encoder) > 0


@pytest.mark.parametrize(
    "freeze_backbone, finetune_layers", [(True, -1), (False, -1), (False, 0)]
)
def test_all_layers_trainable(kind, freeze_backbone, finetune_layers):
    encoder = build(kind)
    encoder.requires_grad_(False)  # starting state must not matter
    apply_trainability(
        encoder, freeze_backbone=freeze_backbone, finetune_layers=finetune_layers, lora=NO_LORA
    )
    assert count(encoder) == total(encoder)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("freeze_backbone", [True, False])
def test_top_n_blocks_and_final_norm_trainable(kind, n, freeze_backbone):
    _, block_params, dim, _ = ENCODERS[kind]
    encoder = apply_trainability(
        build(kind), freeze_backbone=freeze_backbone, finetune_layers=n, lora=NO_LORA
    )
    assert count(encoder) == n * block_params + 2 * dim  # + final LayerNorm
    blocks = encoder.blocks()
    for i, block in enumerate(blocks):
        expected = i >= len(blocks) - n
        assert all(p.requires_grad == expected for p in block.parameters())
    assert all(p.requires_grad for p in encoder.final_norm().parameters())


def test_fake_total_is_what_the_test_thinks():
    assert total(build("fake")) == FAKE_TOTAL


def test_top_n_larger_than_block_count_names_the_count(kind):
    message = r"train.finetune_layers: 5 is more than the 4 blocks"
    with pytest.raises(TrainabilityError, match=message):
        apply_trainability(build(kind), freeze_backbone=True, finetune_layers=5, lora=NO_LORA)


def test_trainability_error_is_a_value_error():
    with pytest.raises(ValueError, match=r"must be >= 0 or -1 \(got -2\)"):
        apply_trainability(build("fake"), freeze_backbone=True, finetune_layers=-2, lora=NO_LORA)


# -- LoRA ----------------------------------------------------------------------------------


def lora(**kwargs):
    return LoraConfig(enabled=True, **{"rank": 4, "target_layers": 2, **kwargs})


@pytest.mark.parametrize("target_layers, n_blocks", [(1, 1), (2, 2), (-1, 4)])
def test_lora_trains_only_adapters_on_the_top_blocks(kind, target_layers, n_blocks):
    dim = ENCODERS[kind][2]
    encoder = build(kind)
    prefixes = encoder.block_prefixes()
    base_total = total(encoder)
    apply_trainability(
        encoder, freeze_backbone=True, finetune_layers=0, lora=lora(target_layers=target_layers)
    )
    # A: rank x in, B: out x rank, on q/k/v of each adapted block
    assert count(encoder) == n_blocks * 3 * 4 * (dim + dim)
    assert count(encoder, trainable=False) == base_total
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert all("lora_" in name for name in trainable)
    top = prefixes[len(prefixes) - n_blocks :]
    adapted = {name.split(".lora_")[0] for name in trainable}
    assert adapted == {
        f"{prefix}.{attn}{proj}"
        for prefix in top
        for proj in ("q_proj", "k_proj", "v_proj")
        for attn in (["self_attn."] if kind == "siglip" else [""])
    }


def test_lora_keeps_the_encoder_class_and_its_outputs_at_init(kind):
    encoder = build(kind).eval()
    x = pixels(kind)
    before = encoder(pixel_values=x).tokens
    result = apply_trainability(encoder, freeze_backbone=True, finetune_layers=0, lora=lora())
    assert result is encoder
    assert isinstance(encoder, ENCODERS[kind][0])
    assert encoder.out_dim == ENCODERS[kind][2]
    assert encoder.preprocessing.size == pixels(kind).shape[-2:]
    assert len(encoder.blocks()) == 4
    # peft initialises lora_B to zero: the adapted encoder computes what the base did
    assert torch.equal(encoder(pixel_values=x).tokens, before)


def test_lora_target_modules_override(kind):
    dim = ENCODERS[kind][2]
    encoder = build(kind)
    apply_trainability(
        encoder,
        freeze_backbone=True,
        finetune_layers=0,
        lora=lora(target_modules=("v_proj",), rank=2, target_layers=3),
    )
    assert count(encoder) == 3 * 2 * (dim + dim)
    assert all(".v_proj.lora_" in n for n, p in encoder.named_parameters() if p.requires_grad)


def test_lora_target_names_are_exact_qualified_names():
    names = lora_target_names(build("fake"), lora(target_layers=1))
    assert names == ["layers.3.q_proj", "layers.3.k_proj", "layers.3.v_proj"]


def test_lora_with_finetune_layers_is_an_error():
    message = r"train.finetune_layers: must be 0 when train.lora"
    with pytest.raises(TrainabilityError, match=message):
        apply_trainability(build("fake"), freeze_backbone=True, finetune_layers=2, lora=lora())


def test_lora_target_layers_larger_than_block_count():
    with pytest.raises(TrainabilityError, match=r"train.lora.target_layers: 6 is more than the 4"):
        apply_trainability(
            build("fake"), freeze_backbone=True, finetune_layers=0, lora=lora(target_layers=6)
        )


def test_lora_without_declared_or_configured_targets():
    encoder = build("fake")
    encoder.lora_target_modules = ()
    with pytest.raises(TrainabilityError, match=r"declares no LoRA target modules"):
        apply_trainability(encoder, freeze_backbone=True, finetune_layers=0, lora=lora())


def test_lora_unknown_target_module():
    with pytest.raises(TrainabilityError, match=r"none of qkv is a module in the top 2 blocks"):
        apply_trainability(
            build("fake"),
            freeze_backbone=True,
            finetune_layers=0,
            lora=lora(target_modules=("qkv",)),
        )


def test_lora_applied_twice_is_an_error():
    encoder = apply_trainability(build("fake"), **MODES["lora"])
    with pytest.raises(TrainabilityError, match=r"already has LoRA adapters"):
        apply_trainability(encoder, freeze_backbone=True, finetune_layers=0, lora=lora())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rank", 0, "must be > 0 (got 0)"),
        ("target_layers", 0, "must be >= 1 or -1 (got 0)"),
        ("dropout", 1.0, "must be in [0.0, 1.0) (got 1.0)"),
    ],
)
def test_lora_config_validation(field, value, message):
    with pytest.raises(FieldError) as info:
        LoraConfig(**{field: value})
    assert info.value.field == field
    assert str(info.value) == message


# -- training steps and parameter groups ---------------------------------------------------

MODES = {
    "frozen": dict(freeze_backbone=True, finetune_layers=0, lora=NO_LORA),
    "top2": dict(freeze_backbone=True, finetune_layers=2, lora=NO_LORA),
    "all": dict(freeze_backbone=False, finetune_layers=0, lora=NO_LORA),
    "lora": dict(freeze_backbone=True, finetune_layers=0, lora=lora()),
}


def train_steps(model, kind, steps=2, weight_decay=0.0):
    groups = parameter_groups(
        model, head_lr=1e-2, backbone_lr=1e-2, lora_lr=1e-2, weight_decay=weight_decay
    )
    optimizer = torch.optim.AdamW(groups)
    target = torch.tensor([1.0, 0.0])
    for step in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(pixels(kind, seed=step)), target
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_adamw_changes_exactly_the_trainable_params(kind, mode):
    model = Classifier(apply_trainability(build(kind), **MODES[mode]))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # two steps: lora_B starts at zero, so lora_A only gets a gradient from the second step
    train_steps(model, kind, steps=2)
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name


def group_ids(groups, name):
    return {id(p) for g in groups if g["name"] == name for p in g["params"]}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_parameter_groups_assign_params_and_learning_rates(mode):
    model = Classifier(apply_trainability(build("fake"), **MODES[mode]))
    groups = parameter_groups(model, head_lr=1.0, backbone_lr=2.0, lora_lr=3.0, weight_decay=0.1)
    named = dict(model.named_parameters())
    head = {id(p) for n, p in named.items() if n.startswith("head.")}
    backbone = {
        id(p)
        for n, p in named.items()
        if n.startswith("vision.") and p.requires_grad and "lora_" not in n
    }
    lora_ids = {id(p) for n, p in named.items() if "lora_" in n}
    assert group_ids(groups, "head") == head
    assert group_ids(groups, "backbone") == backbone
    assert group_ids(groups, "lora") == lora_ids
    # no empty groups, no frozen or duplicated params
    assert all(g["params"] for g in groups)
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})
    assert sum(p.numel() for p in listed) == count(model)
    lr = {"head": 1.0, "backbone": 2.0, "lora": 3.0}
    for g in groups:
        assert g["lr"] == lr[g["name"]]
        assert all((p.ndim > 1) == g["decay"] for p in g["params"])
        assert g["weight_decay"] == (0.1 if g["decay"] else 0.0)
    present = {"head": head, "backbone": backbone, "lora": lora_ids}
    assert {g["name"] for g in groups} == {name for name, ids in present.items() if ids}


def test_parameter_groups_see_through_a_ddp_style_wrapper():
    model = Classifier(apply_trainability(build("fake"), **MODES["top2"]))

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    direct = parameter_groups(model, head_lr=1.0, backbone_lr=2.0, lora_lr=3.0, weight_decay=0.1)
    wrapped = parameter_groups(
        Wrapper(model), head_lr=1.0, backbone_lr=2.0, lora_lr=3.0, weight_decay=0.1
    )
    for name in ("head", "backbone"):
        assert group_ids(wrapped, name) == group_ids(direct, name)


def test_trainable_summary_counts_per_child():
    model = Classifier(apply_trainability(build("fake"), **MODES["top2"]))
    head_total = linear_params(DIM, 4) + 2 * 4 + linear_params(4, 1)
    assert trainable_summary(model) == {
        "vision": {"trainable": 2 * BLOCK_PARAMS + 2 * DIM, "total": FAKE_TOTAL},
        "head": {"trainable": head_total, "total": head_total},
        "all": {
            "trainable": 2 * BLOCK_PARAMS + 2 * DIM + head_total,
            "total": FAKE_TOTAL + head_total,
        },
    }


# -- checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["top2", "lora"])
def test_saved_state_reproduces_outputs_after_rebuild(kind, mode):
    model = Classifier(apply_trainability(build(kind, seed=0), **MODES[mode]))
    train_steps(model, kind, steps=2)
    model.eval()
    x = pixels(kind, seed=7)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    # a different seed: different random base and adapter init until the state is loaded
    rebuilt = Classifier(apply_trainability(build(kind, seed=1), **MODES[mode])).eval()
    with torch.no_grad():
        assert not torch.equal(rebuilt(x), expected)
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)


def test_lora_state_dict_restores_adapters_on_the_same_base(kind):
    encoder = apply_trainability(build(kind, seed=0), **MODES["lora"])
    with torch.no_grad():  # stand-in for training: make every adapter weight non-trivial
        for name, p in encoder.named_parameters():
            if "lora_" in name:
                p.normal_()
    saved = lora_state_dict(encoder)
    assert saved and all("lora_" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) == count(encoder)
    x = pixels(kind)
    expected = encoder.eval()(pixel_values=x).tokens

    torch.manual_seed(0)  # the same base weights (as a pretrained checkpoint would give)
    base = ENCODERS[kind][0]()
    torch.manual_seed(123)  # ... but fresh adapters
    rebuilt = apply_trainability(base, **MODES["lora"]).eval()
    assert not torch.equal(rebuilt(pixel_values=x).tokens, expected)
    load_lora_state_dict(rebuilt, saved)
    assert torch.equal(rebuilt(pixel_values=x).tokens, expected)


def test_load_lora_state_dict_rejects_a_mismatch():
    encoder = apply_trainability(build("fake"), **MODES["lora"])
    other = apply_trainability(build("fake"), **{**MODES["lora"], "lora": lora(target_layers=1)})
    with pytest.raises(TrainabilityError, match=r"LoRA weights do not fit this encoder"):
        load_lora_state_dict(other, lora_state_dict(encoder))


# -- batch norm in frozen CNN blocks -------------------------------------------------------


class FakeCnn(VisionEncoder):
    name = "fake_cnn"

    def __init__(self):
        super().__init__()
        self.out_dim = 4
        self.preprocessing = Preprocessing(size=(8, 8))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4)) for c in (3, 4)
        )

    def forward(self, pixel_values):
        x = pixel_values
        for stage in self.stages:
            x = stage(x)
        tokens = x.flatten(2).transpose(1, 2)
        return TokenOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))

    def blocks(self):
        return list(self.stages)


def test_freeze_norm_statistics_keeps_frozen_batchnorm_running_stats():
    encoder = apply_trainability(FakeCnn(), freeze_backbone=True, finetune_layers=1, lora=NO_LORA)
    encoder.train()
    freeze_norm_statistics(encoder)
    frozen_bn, trained_bn = encoder.stages[0][1], encoder.stages[1][1]
    frozen_mean = frozen_bn.running_mean.clone()
    trained_mean = trained_bn.running_mean.clone()
    encoder(pixel_values=torch.randn(2, 3, 8, 8) + 3.0)
    assert torch.equal(frozen_bn.running_mean, frozen_mean)
    assert not torch.equal(trained_bn.running_mean, trained_mean)


class FixedHistogram(VisionEncoder):
    """A fixed feature extractor: no parameters, ``trainable = False``."""

    name = "fixed_histogram"
    out_dim = 4
    trainable = False

    def __init__(self):
        super().__init__()
        self.preprocessing = Preprocessing(size=(8, 8))
        self.statistics = nn.Identity()

    def forward(self, pixel_values):
        counts = torch.stack([(pixel_values > t).float().mean(dim=(1, 2, 3)) for t in (-0.5, 0.0, 0.5, 0.9)], dim=1)
        return TokenOutput(counts[:, None], torch.ones(counts.shape[0], 1, dtype=torch.bool))

    def blocks(self):
        return [self.statistics]


@pytest.mark.parametrize(
    ("settings", "key", "value"),
    [
        ({"finetune_layers": -1}, "train.finetune_layers", "-1"),
        ({"finetune_layers": 2}, "train.finetune_layers", "2"),
        ({"freeze_backbone": False}, "train.freeze_backbone", "false"),
        ({"lora": LoraConfig(enabled=True)}, "train.lora.enabled", "true"),
    ],
)
def test_a_fixed_extractor_asked_to_train_names_the_key(settings, key, value):
    kwargs = {"freeze_backbone": True, "finetune_layers": 0, "lora": LoraConfig(), **settings}
    with pytest.raises(TrainabilityError) as failure:
        apply_trainability(FixedHistogram(), **kwargs)
    assert str(failure.value) == (
        f"{key}: vision encoder 'fixed_histogram' is a fixed feature extractor with nothing to train (got {value}); "
        "use freeze_backbone = true, finetune_layers = 0 and no LoRA"
    )


class _Plugin:
    """A plugin object registering one vision encoder class under its name."""

    def __init__(self, cls):
        self.cls = cls

    @hookimpl
    def register_vision_encoders(self, register):
        register(self.cls.name, lambda params: self.cls(), NoParams)


def _registry_with(cls):
    from mmcore.plugins.manager import make_registry

    return make_registry(load_entrypoints=False, extra_plugins=[(cls.name, _Plugin(cls))])


def test_a_fixed_extractor_frozen_is_fine_and_passes_its_contract():
    from mmcore.testing import check_vision_encoder

    encoder = apply_trainability(FixedHistogram(), freeze_backbone=True, finetune_layers=0, lora=LoraConfig())
    assert list(encoder.parameters()) == []
    check_vision_encoder("fixed_histogram", registry=_registry_with(FixedHistogram))


class FixedWithWeights(FixedHistogram):
    """Says ``trainable = False`` but carries a parameter: the contract check refuses it."""

    name = "fixed_with_weights"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))


def test_the_contract_refuses_a_fixed_extractor_with_parameters():
    from mmcore.testing import check_vision_encoder

    with pytest.raises(AssertionError, match="trainable = False, but the encoder has parameters"):
        check_vision_encoder("fixed_with_weights", registry=_registry_with(FixedWithWeights))
