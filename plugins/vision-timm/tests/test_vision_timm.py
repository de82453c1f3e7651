"""mmcore-vision-timm: entry point, CNN and ViT tokens, tiny families, hub ids and errors."""

import pytest
import torch

from mmcore import WEIGHTS_HINT, MmcoreError, WeightsError, local_weights_hint
from mmcore.testing import build, check_vision_encoder, encode_samples, get_registry


def tiny(model_name):
    return {"pretrained": False, "tiny": True, "model_name": model_name}


def test_entry_point():
    assert get_registry().get("vision", "timm").package == "mmcore-vision-timm"


@pytest.mark.parametrize(
    "model_name, tokens, dim, cls, blocks",
    [
        ("vit_small_patch16_224.augreg_in21k_ft_in1k", 1 + 16, 32, True, 2),  # CLS + 4x4 patches
        ("resnet50.a1_in1k", 4, 256, False, 4),  # 64 px -> 2x2 map, Bottleneck 64 * 4 channels
        ("convnext_tiny", 4, 64, False, 4),  # 64 px -> 2x2 map, 4 stages
    ],
)
def test_tiny_contract_and_tokens(model_name, tokens, dim, cls, blocks):
    encoder = check_vision_encoder("timm", tiny(model_name))
    with torch.no_grad():
        out, mask = encode_samples(encoder)
    assert out.shape == (2, tokens, dim) and encoder.out_dim == dim
    assert mask.dtype == torch.bool and mask.all() and torch.isfinite(out).all()
    assert encoder.has_cls_token is cls and encoder.channels_last is not cls
    assert len(encoder.blocks()) == blocks
    assert encoder.lora_target_modules == (("qkv", "proj") if cls else ())


def test_full_models_tokens_from_forward_features():
    with torch.device("meta"):
        swin = build("vision", "timm", {"pretrained": False, "model_name": "swin_tiny_patch4_window7_224"})
        tokens, _ = swin.eval()(pixel_values=torch.zeros(2, 3, 224, 224))
        assert tokens.shape == (2, 49, 768)  # NHWC 7x7 map, not mistaken for 7 tokens of 7
        reg = build("vision", "timm", {"pretrained": False, "model_name": "vit_small_patch14_reg4_dinov2"})
        size = reg.preprocessing.size
        tokens, _ = reg.eval()(pixel_values=torch.zeros(2, 3, *size))
    assert reg.has_cls_token and reg.model.num_prefix_tokens == 5  # CLS + 4 registers first
    assert tokens.shape == (2, 5 + (size[0] // 14) ** 2, 384)


def test_default_model_is_convnext_base():
    with torch.device("meta"):
        encoder = build("vision", "timm", {"pretrained": False})
    assert encoder.out_dim == 1024 and len(encoder.blocks()) == 4


def test_unknown_model_name_says_what_to_do():
    with pytest.raises(MmcoreError) as info:
        build("vision", "timm", {"model_name": "resnt50", "pretrained": False})
    assert str(info.value) == (
        "vision encoder 'timm': params.model_name: unknown timm model 'resnt50' "
        "(did you mean resnet50?); see timm.list_models()"
    )


def test_tiny_for_an_unsupported_family_is_an_error():
    with pytest.raises(MmcoreError) as info:
        build("vision", "timm", tiny("mobilenetv3_small_100"))
    assert str(info.value) == (
        "vision encoder 'timm': tiny = true is not available for timm model "
        "'mobilenetv3_small_100' (mobilenetv3); it is for convnext, deit, resnet, "
        "vision_transformer models. Use a small model with pretrained = false instead"
    )


def test_failed_hub_download_names_the_model(monkeypatch):
    import timm.models._builder

    requested = []

    def offline(hub_id, *args, **kwargs):
        requested.append(hub_id)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    with pytest.raises(WeightsError) as info:
        build("vision", "timm", {"model_name": "resnet10t.c3_in1k"})
    assert requested == ["timm/resnet10t.c3_in1k"]
    assert str(info.value) == (
        "vision encoder 'timm': could not load weights 'resnet10t.c3_in1k' "
        "(We couldn't connect to 'https://huggingface.co')" + WEIGHTS_HINT
    )


def test_local_checkpoint_loads_and_missing_one_fails(tmp_path):
    source = build("vision", "timm", tiny("resnet50"))
    state = {k.removeprefix("model."): v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "resnet.pth")
    loaded = build("vision", "timm", {"tiny": True, "model_name": "resnet50", "weights": str(tmp_path / "resnet.pth")})
    with torch.no_grad():
        assert torch.equal(encode_samples(loaded).tokens, encode_samples(source).tokens)
    missing = tmp_path / "nothing-here"
    with pytest.raises(WeightsError) as info:
        build("vision", "timm", {"model_name": "resnet50", "weights": str(missing)})
    assert str(info.value) == (
        f"vision encoder 'timm': could not load weights {str(missing)!r} "
        f"(no such file or directory: {missing})" + local_weights_hint(missing)
    )
