"""mmcore-vision-efficientnet: entry point, contract, token counts, weights id and load errors."""

import mmcore_vision_efficientnet
import pytest
import torch

from mmcore import WEIGHTS_HINT, ResizeCropPreprocessing, WeightsError, local_weights_hint
from mmcore.testing import build, check_vision_encoder, encode_samples, get_registry

TINY = {"pretrained": False, "tiny": True}



def test_entry_point():
    assert get_registry().get("vision", "efficientnet").package == "mmcore-vision-efficientnet"


def test_weights_match_the_component_table():
    # MISSION.md: efficientnet = EfficientNetV2-L, 1280-d
    assert mmcore_vision_efficientnet.WEIGHTS == {
        "efficientnet": "EfficientNet_V2_L_Weights.IMAGENET1K_V1"
    }


def test_tiny_contract_and_tokens():
    encoder = check_vision_encoder("efficientnet", TINY)
    with torch.no_grad():
        tokens, mask = encode_samples(encoder)
    assert tokens.shape == (2, 4, 1280)  # 64 px / stride 32 -> 2x2, V2-L's 1280 channels
    assert mask.dtype == torch.bool and mask.all() and torch.isfinite(tokens).all()
    assert len(encoder.blocks()) == 7
    assert encoder.final_norm() is encoder.features[-1]


def test_full_architecture_is_efficientnet_v2_l_at_480px():
    with torch.device("meta"):
        encoder = build("vision", "efficientnet", {"pretrained": False})
        tokens, _ = encoder.eval()(pixel_values=torch.zeros(2, 3, 480, 480))
    assert tokens.shape == (2, 225, 1280)  # 480 / 32 = 15
    assert [len(stage) for stage in encoder.blocks()] == [4, 7, 7, 10, 19, 25, 7]
    assert encoder.preprocessing == ResizeCropPreprocessing(
        size=(480, 480), resize_size=480, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
    )


def test_top_stage_finetune_trains_the_last_stage_and_head_conv():
    from mmcore.testing import LoraConfig, apply_trainability

    encoder = build("vision", "efficientnet", TINY)
    apply_trainability(encoder, freeze_backbone=True, finetune_layers=1, lora=LoraConfig())
    trainable = {n.split(".")[1] for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"7", "8"}  # features.7 = last stage, features.8 = 1x1 conv to 1280


def test_pretrained_requests_its_weights_and_fails_in_one_line(monkeypatch):
    import torchvision.models

    requested = []

    def offline_builder(weights=None, **kwargs):
        requested.append(weights)
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "efficientnet_v2_l", offline_builder)
    with pytest.raises(WeightsError) as info:
        build("vision", "efficientnet", {})
    weights_id = "EfficientNet_V2_L_Weights.IMAGENET1K_V1"
    assert requested == [torchvision.models.get_weight(weights_id)]
    assert str(info.value) == (
        f"vision encoder 'efficientnet': could not load weights {weights_id!r} (no network)" + WEIGHTS_HINT
    )


def test_local_weights_file_loads(tmp_path):
    source = build("vision", "efficientnet", TINY)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "effnet.pth")
    loaded = build("vision", "efficientnet", {"tiny": True, "weights": str(tmp_path / "effnet.pth")})
    with torch.no_grad():
        assert torch.equal(encode_samples(loaded).tokens, encode_samples(source).tokens)


def test_missing_local_file_fails_in_one_line(tmp_path):
    missing = tmp_path / "effnet.pth"
    with pytest.raises(WeightsError) as info:
        build("vision", "efficientnet", {"weights": str(missing)})
    assert str(info.value) == (
        f"vision encoder 'efficientnet': could not load weights {str(missing)!r} "
        f"(no such file or directory: {missing})" + local_weights_hint(missing)
    )
