"""mmcore-vision-resnet: entry point, contract, token counts, weights ids and load errors."""

import mmcore_vision_resnet
import pytest
import torch

from mmcore import WEIGHTS_HINT, ResizeCropPreprocessing, WeightsError, local_weights_hint
from mmcore.testing import build, check_vision_encoder, encode_samples, get_registry, sample_images

NAMES = ("resnet18", "resnet50", "resnet101")
TINY = {"pretrained": False, "tiny": True}
#: (out dim, residual blocks) of the full architectures (torchvision: 2-2-2-2, 3-4-6-3, 3-4-23-3)
FULL = {"resnet18": (512, 8), "resnet50": (2048, 16), "resnet101": (2048, 33)}



@pytest.mark.parametrize("name", NAMES)
def test_entry_point_registers_every_name(name):
    assert get_registry().get("vision", name).package == "mmcore-vision-resnet"


def test_weights_match_the_component_table():
    # MISSION.md: resnet50/resnet101 (2048-d) with ImageNet weights; resnet18 for demos
    assert mmcore_vision_resnet.WEIGHTS == {
        "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
        "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
        "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
    }


@pytest.mark.parametrize("name", NAMES)
def test_tiny_contract_and_tokens(name):
    encoder = check_vision_encoder(name, TINY)
    with torch.no_grad():
        tokens, mask = encode_samples(encoder)
    # 64 px / stride 32 -> a 2x2 feature map -> 4 tokens; resnet50/101 keep 2048-d
    assert tokens.shape == (2, 4, FULL[name][0])
    assert mask.dtype == torch.bool and mask.all()
    assert torch.isfinite(tokens).all()
    assert not encoder.has_cls_token and encoder.channels_last
    assert len(encoder.blocks()) == 4
    assert encoder.weights == "random"


@pytest.mark.parametrize("name", NAMES)
def test_full_architecture_shapes_blocks_and_preprocessing(name):
    with torch.device("meta"):  # structure only: no memory, no init cost
        encoder = build("vision", name, {"pretrained": False})
        tokens, mask = encoder.eval()(pixel_values=torch.zeros(2, 3, 224, 224))
    out_dim, blocks = FULL[name]
    assert encoder.out_dim == out_dim and tokens.shape == (2, 49, out_dim)
    assert len(encoder.blocks()) == blocks
    assert encoder.block_prefixes()[0] == "model.layer1.0"
    assert encoder.block_prefixes()[-1] == f"model.layer4.{2 if blocks > 8 else 1}"
    assert encoder.preprocessing == ResizeCropPreprocessing(
        size=(224, 224),
        resize_size=256 if name == "resnet18" else 232,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bilinear",
    )


def test_preprocessing_matches_torchvision_eval_transform():
    from torchvision.models import get_weight
    from torchvision.transforms.v2 import functional as F

    with torch.device("meta"):
        prep = build("vision", "resnet50", {"pretrained": False}).preprocessing
    reference = get_weight(mmcore_vision_resnet.WEIGHTS["resnet50"]).transforms()
    for image in sample_images():
        pixels = prep(image)["pixel_values"]
        assert pixels.shape == (3, 224, 224)
        # same ops; torchvision's v1 and v2 resize may round a uint8 pixel differently
        one_level = 1.01 / 255 / min(prep.std)
        assert (pixels - reference(F.pil_to_tensor(image))).abs().max() <= one_level
    assert prep.target_size == (232, 232)  # JPEG draft() must keep the 232 px shorter side


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_requests_its_weights_and_fails_in_one_line(name, monkeypatch):
    import torchvision.models

    requested = []

    def offline_builder(weights=None, **kwargs):
        requested.append(weights)
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, name, offline_builder)
    weights_id = mmcore_vision_resnet.WEIGHTS[name]
    with pytest.raises(WeightsError) as info:
        build("vision", name, {})
    assert requested == [torchvision.models.get_weight(weights_id)]
    assert str(info.value) == (
        f"vision encoder {name!r}: could not load weights {weights_id!r} (no network)" + WEIGHTS_HINT
    )


def test_failed_download_from_torchvision_url(monkeypatch):
    import torchvision.models._api

    urls = []

    def offline(url, *args, **kwargs):
        urls.append(url)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"^vision encoder 'resnet18': could not load weights "):
        build("vision", "resnet18", {"pretrained": True})
    assert urls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]


def test_local_weights_file_and_directory_load(tmp_path):
    source = build("vision", "resnet50", TINY)
    # a torchvision-style state dict: backbone keys under no prefix, plus a classifier (fc)
    state = {k.removeprefix("model."): v for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet.pth")
    (tmp_path / "dir").mkdir()
    torch.save(state, tmp_path / "dir" / "model.pth")
    with torch.no_grad():
        expected = encode_samples(source).tokens
        for path in (tmp_path / "resnet.pth", tmp_path / "dir"):
            loaded = build("vision", "resnet50", {"tiny": True, "weights": str(path)})
            assert torch.equal(encode_samples(loaded).tokens, expected)
            assert loaded.weights.endswith(".pth")


def test_local_weights_that_do_not_fit_fail_in_one_line(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as info:
        build("vision", "resnet18", {"tiny": True, "weights": str(tmp_path / "bad.pth")})
    assert "\n" not in str(info.value)
    assert "weights do not fit the architecture" in str(info.value)


def test_missing_local_directory_fails_in_one_line(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(WeightsError) as info:
        build("vision", "resnet50", {"weights": str(missing)})
    assert str(info.value) == (
        f"vision encoder 'resnet50': could not load weights {str(missing)!r} "
        f"(no such file or directory: {missing})" + local_weights_hint(missing)
    )


def test_lora_wraps_block_convolutions():
    from mmcore.testing import LoraConfig, apply_trainability

    encoder = build("vision", "resnet50", TINY)
    apply_trainability(
        encoder, freeze_backbone=True, finetune_layers=0, lora=LoraConfig(enabled=True, target_layers=1)
    )
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layer4.0.conv") and "lora_" in n for n in trainable)
    tokens, _ = encode_samples(encoder)
    assert tokens.shape == (2, 4, 2048)
