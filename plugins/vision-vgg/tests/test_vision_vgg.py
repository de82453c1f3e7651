"""mmcore-vision-vgg: entry point, contract, token counts, weights id and load errors."""

import mmcore_vision_vgg
import pytest
import torch

from mmcore import WEIGHTS_HINT, ResizeCropPreprocessing, WeightsError, local_weights_hint
from mmcore.testing import build, check_vision_encoder, encode_samples, get_registry

TINY = {"pretrained": False, "tiny": True}



def test_entry_point():
    assert get_registry().get("vision", "vgg16").package == "mmcore-vision-vgg"


def test_weights_match_the_component_table():
    assert mmcore_vision_vgg.WEIGHTS == {"vgg16": "VGG16_Weights.IMAGENET1K_V1"}


def test_tiny_contract_and_tokens():
    encoder = check_vision_encoder("vgg16", TINY)
    with torch.no_grad():
        tokens, mask = encode_samples(encoder)
    assert tokens.shape == (2, 4, 512)  # 64 px / 5 max-pools -> 2x2
    assert mask.dtype == torch.bool and mask.all() and torch.isfinite(tokens).all()
    assert len(encoder.blocks()) == 5
    assert all(isinstance(block[-1], torch.nn.MaxPool2d) for block in encoder.blocks())
    assert encoder.lora_target_modules == () and not encoder.has_cls_token


def test_full_architecture_has_vgg16_blocks_and_no_classifier():
    with torch.device("meta"):
        encoder = build("vision", "vgg16", {"pretrained": False})
        tokens, mask = encoder.eval()(pixel_values=torch.zeros(2, 3, 224, 224))
    assert tokens.shape == (2, 49, 512) and mask.shape == (2, 49)
    convs = [
        sum(isinstance(m, torch.nn.Conv2d) for m in block.modules()) for block in encoder.blocks()
    ]
    assert convs == [2, 2, 3, 3, 3]  # VGG16 = 13 conv layers
    assert not any("classifier" in name for name, _ in encoder.named_modules())
    assert sum(p.numel() for p in encoder.parameters()) == 14_714_688  # VGG16's conv layers
    assert encoder.preprocessing == ResizeCropPreprocessing(
        size=(224, 224), resize_size=256, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), interpolation="bilinear",
    )


def test_pretrained_requests_its_weights_and_fails_in_one_line(monkeypatch):
    import torchvision.models

    requested = []

    def offline_builder(weights=None, **kwargs):
        requested.append(weights)
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "vgg16", offline_builder)
    with pytest.raises(WeightsError) as info:
        build("vision", "vgg16", {})
    assert requested == [torchvision.models.get_weight("VGG16_Weights.IMAGENET1K_V1")]
    assert str(info.value) == (
        "vision encoder 'vgg16': could not load weights 'VGG16_Weights.IMAGENET1K_V1' (no network)"
        + WEIGHTS_HINT
    )


def test_local_torchvision_state_dict_loads_ignoring_the_classifier(tmp_path):
    from safetensors.torch import save_file

    source = build("vision", "vgg16", TINY)
    # torchvision numbers the layers of ``features`` flat: regroup the keys as its files do
    flat = [m for block in source.blocks() for m in block]
    names = {id(m): f"features.{i}" for i, m in enumerate(flat)}
    state = {
        f"{names[id(m)]}.{param}": tensor.contiguous()
        for block in source.blocks() for m in block
        for param, tensor in m.state_dict().items()
    }
    state["classifier.0.weight"] = torch.zeros(8, 8)
    (tmp_path / "vgg").mkdir()
    save_file(state, tmp_path / "vgg" / "model.safetensors")
    loaded = build("vision", "vgg16", {"tiny": True, "weights": str(tmp_path / "vgg")})
    with torch.no_grad():
        assert torch.equal(encode_samples(loaded).tokens, encode_samples(source).tokens)
    assert loaded.weights == str(tmp_path / "vgg" / "model.safetensors")


def test_missing_local_directory_fails_in_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(WeightsError) as info:
        build("vision", "vgg16", {"weights": str(missing)})
    assert str(info.value) == (
        f"vision encoder 'vgg16': could not load weights {str(missing)!r} "
        f"(no such file or directory: {missing})" + local_weights_hint(missing)
    )
