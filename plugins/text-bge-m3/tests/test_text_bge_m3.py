import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import re
from pathlib import Path

import mmcore_text_bge_m3 as plugin
import pytest
import torch

from mmcore import FieldError, WeightsError
from mmcore.testing import check_text_encoder, get_registry

DIST = "mmcore-text-bge-m3"
MISSION_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "docs" / "MISSION.md",
    Path("/work/shared/docs/MISSION.md"),
)


def build(**params):
    registration = get_registry().get("text", "bge_m3")
    return registration.factory(registration.params_cls(**params))


@pytest.fixture(scope="module")
def tiny():
    return build(tiny=True)


def test_entry_point_registers_bge_m3():
    registry = get_registry()
    assert registry.get("text", "bge_m3").package == DIST
    assert registry.get("text", "bge_m3").params_cls is plugin.BgeM3Params


def test_hub_id_and_dim_match_mission():
    assert plugin.HUB_IDS == {"bge_m3": "BAAI/bge-m3"}
    assert plugin.SPEC.hub_id == "BAAI/bge-m3"
    mission = next((path for path in MISSION_CANDIDATES if path.exists()), None)
    if mission is None:
        pytest.skip("MISSION.md not found")
    dims = dict(re.findall(r"^\| text \| `(\w+)` \| .* \| (\d+) \|$", mission.read_text(), re.M))
    assert int(dims["bge_m3"]) == plugin.SPEC.out_dim == 1024


def test_dense_embedding_is_the_normalized_cls_state(tiny):
    texts = ["BGE-M3 dense vector", "", "a second, longer piece of OCR text"]
    out = tiny(texts)
    assert out.shape == (3, 32) and tiny.out_dim == 32
    assert torch.isfinite(out).all()
    batch = tiny.tokenizer(texts, padding=True, truncation=True, max_length=512,
                           return_tensors="pt")
    with torch.no_grad():
        hidden = tiny.backbone(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert type(tiny.backbone).__name__ == "XLMRobertaModel"


def test_batching_and_empty_strings(tiny):
    texts = ["", "short", "", "a much longer text " * 30, "x"]
    whole = tiny(texts)
    chunked = build(tiny=True, batch_size=2)(texts)
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert torch.allclose(whole[0], whole[2])
    assert torch.allclose(whole.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_frozen_and_no_grad(tiny):
    with torch.enable_grad():
        out = tiny(["text"])
    assert not out.requires_grad
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.backbone.training


def test_defaults_and_identity():
    params = plugin.BgeM3Params()
    assert (params.max_length, params.normalize, params.batch_size) == (512, True, 64)
    a, b = build(tiny=True), build(tiny=True, max_length=64)
    assert a.identity.startswith("bge_m3|random|")
    assert a.identity != b.identity
    assert torch.equal(a(["same seed"]), build(tiny=True)(["same seed"]))
    with pytest.raises(FieldError, match=r"^must be > 0 \(got -2\)$"):
        plugin.BgeM3Params(batch_size=-2)


def test_failed_download_is_one_actionable_line(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(WeightsError) as info:
        build(weights=missing)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"text encoder 'bge_m3': could not load weights {missing!r} (")
    assert message.endswith("or set params.pretrained = false for random weights")


def test_contract_checks():
    check_text_encoder("bge_m3", {"tiny": True})
