"""mmcore-vision-vit: entry point, contract, tokens, hub ids, LoRA targets and load errors."""

import mmcore_vision_vit
import pytest
import torch

from mmcore import WEIGHTS_HINT, ResizeCropPreprocessing, WeightsError, local_weights_hint
from mmcore.testing import build, check_vision_encoder, encode_samples, get_registry

NAMES = ("vit", "vit_base", "vit_large")
TINY = {"pretrained": False, "tiny": True}



@pytest.mark.parametrize("name", NAMES)
def test_entry_point_registers_every_name(name):
    assert get_registry().get("vision", name).package == "mmcore-vision-vit"


def test_hub_ids_match_the_component_table():
    # MISSION.md: vit (documented: ViT-B/16, 768-d), vit_base 768-d, vit_large 1024-d
    assert mmcore_vision_vit.WEIGHTS == {
        "vit": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "vit_base": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "vit_large": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    }


@pytest.mark.parametrize("name", NAMES)
def test_tiny_contract_and_tokens(name):
    encoder = check_vision_encoder(name, TINY)
    with torch.no_grad():
        tokens, mask = encode_samples(encoder)
    assert tokens.shape == (2, 1 + 16, 32)  # CLS + (32 px / patch 8)^2, hidden 32
    assert mask.dtype == torch.bool and mask.all() and torch.isfinite(tokens).all()
    assert encoder.has_cls_token and not encoder.channels_last
    assert len(encoder.blocks()) == 2
    assert encoder.final_norm() is encoder.model.norm


@pytest.mark.parametrize("name, dim, depth", [("vit", 768, 12), ("vit_base", 768, 12), ("vit_large", 1024, 24)])
def test_full_architectures(name, dim, depth):
    with torch.device("meta"):
        encoder = build("vision", name, {"pretrained": False})
        tokens, _ = encoder.eval()(pixel_values=torch.zeros(2, 3, 224, 224))
    assert encoder.out_dim == dim and tokens.shape == (2, 197, dim)
    assert len(encoder.blocks()) == depth
    assert encoder.preprocessing == ResizeCropPreprocessing(
        size=(224, 224), resize_size=248, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
    )


def test_lora_wraps_attention_linears_of_the_top_blocks():
    from mmcore.testing import LoraConfig, lora_target_names

    encoder = build("vision", "vit_base", TINY)
    assert lora_target_names(encoder, LoraConfig(enabled=True, target_layers=1)) == [
        "model.blocks.1.attn.qkv",
        "model.blocks.1.attn.proj",
    ]


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_requests_its_hub_id_and_fails_in_one_line(name, monkeypatch):
    import timm

    requested = []

    def offline_create_model(model_name, pretrained=False, **kwargs):
        requested.append((model_name, pretrained))
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    with pytest.raises(WeightsError) as info:
        build("vision", name, {})
    hub_id = mmcore_vision_vit.WEIGHTS[name]
    assert requested == [(hub_id, True)]
    assert str(info.value) == (
        f"vision encoder {name!r}: could not load weights {hub_id!r} (no network)" + WEIGHTS_HINT
    )


def test_local_timm_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    source = build("vision", "vit_large", TINY)
    state = {k.removeprefix("model."): v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    loaded = build("vision", "vit_large", {"tiny": True, "weights": str(tmp_path)})
    with torch.no_grad():
        assert torch.equal(encode_samples(loaded).tokens, encode_samples(source).tokens)
    assert loaded.weights == str(tmp_path / "model.safetensors")


def test_missing_local_directory_fails_in_one_line(tmp_path):
    missing = tmp_path / "vit-b"
    with pytest.raises(WeightsError) as info:
        build("vision", "vit", {"weights": str(missing)})
    assert str(info.value) == (
        f"vision encoder 'vit': could not load weights {str(missing)!r} "
        f"(no such file or directory: {missing})" + local_weights_hint(missing)
    )
