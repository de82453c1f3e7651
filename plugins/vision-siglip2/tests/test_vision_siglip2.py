"""mmcore-vision-siglip2: registration, architectures, NaFlex preprocessing and masking."""

import functools
import pickle

import numpy as np
import pytest
import torch
from mmcore_vision_siglip2 import (
    DEFAULT_MAX_NUM_PATCHES,
    HUB_IDS,
    Siglip2NaflexParams,
    Siglip2Params,
)
from mmcore_vision_siglip2.encoders import vision_config
from mmcore_vision_siglip2.naflex import NaflexPreprocessing
from PIL import Image

from mmcore import WeightsError
from mmcore.testing import check_vision_encoder, make_registry

ALL_NAMES = ("siglip2_so400m", "siglip2_base", "siglip2_naflex_so400m", "siglip2_naflex_base")


@functools.cache
def registry():
    """Installed plugins, limited to this one: another plugin's breakage is not ours to test.

    Built with make_registry (entry points on), not the process-wide get_registry(), so the
    limit does not leak into other tests.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMCORE_LOAD_PLUGINS", "mmcore-vision-siglip2")
        return make_registry()


def build(name, **params):
    registration = registry().get("vision", name)
    return registration.factory(registration.params_cls(**params))


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class Images(torch.utils.data.Dataset):
    def __init__(self, images, preprocessing):
        self.images, self.preprocessing = images, preprocessing

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.preprocessing(self.images[index])


def test_entry_point_registers_all_four_names():
    for name in ALL_NAMES:
        assert registry().get("vision", name).package == "mmcore-vision-siglip2"
    assert registry().get("vision", "siglip2_base").params_cls is Siglip2Params
    assert registry().get("vision", "siglip2_naflex_base").params_cls is Siglip2NaflexParams


def test_hub_ids():
    assert HUB_IDS == {
        "siglip2_so400m": "google/siglip2-so400m-patch14-384",
        "siglip2_base": "google/siglip2-base-patch16-224",
        "siglip2_naflex_so400m": "google/siglip2-so400m-patch16-naflex",
        "siglip2_naflex_base": "google/siglip2-base-patch16-naflex",
    }


@pytest.mark.parametrize(
    "name, hidden, intermediate, layers, heads, patch",
    [
        ("siglip2_so400m", 1152, 4304, 27, 16, 14),
        ("siglip2_base", 768, 3072, 12, 12, 16),
        ("siglip2_naflex_so400m", 1152, 4304, 27, 16, 16),
        ("siglip2_naflex_base", 768, 3072, 12, 12, 16),
    ],
)
def test_full_size_configs(name, hidden, intermediate, layers, heads, patch):
    config = vision_config(name)
    assert (config.hidden_size, config.intermediate_size) == (hidden, intermediate)
    assert (config.num_hidden_layers, config.num_attention_heads) == (layers, heads)
    assert config.patch_size == patch
    assert config.vision_use_head is False
    if "naflex" in name:
        assert config.model_type == "siglip2_vision_model"
        assert config.num_patches == 256  # a 16x16 grid of learned position embeddings
    else:
        assert config.model_type == "siglip_vision_model"
    if name == "siglip2_so400m":
        assert config.image_size == 384 and (384 // 14) ** 2 == 729
    if name == "siglip2_base":
        assert config.image_size == 224


def test_naflex_params_default_and_validation():
    assert Siglip2NaflexParams().max_num_patches == DEFAULT_MAX_NUM_PATCHES == 1024
    with pytest.raises(ValueError, match=r"must be >= 1 \(got 0\)"):
        Siglip2NaflexParams(max_num_patches=0)


def test_fixed_resolution_tokens_and_trainability_surface():
    encoder = build("siglip2_base", tiny=True).eval()
    config = encoder.model.config
    assert encoder.preprocessing.size == (config.image_size, config.image_size)
    assert encoder.preprocessing.resize == "squash"
    images = [random_image(50, 20), random_image(30, 90, seed=1)]
    batch = encoder.preprocessing.collate([encoder.preprocessing(im) for im in images])
    out = encoder(**batch)
    tokens = (config.image_size // config.patch_size) ** 2
    assert out.tokens.shape == (2, tokens, encoder.out_dim)
    assert out.mask.dtype == torch.bool and out.mask.all()
    assert encoder.has_cls_token is False
    assert encoder.blocks() == list(encoder.model.encoder.layers)
    assert len(encoder.blocks()) == config.num_hidden_layers
    assert encoder.final_norm() is encoder.model.post_layernorm
    # the attention-pooling head is not built: mmcore's pooling replaces it
    assert not hasattr(encoder.model, "head")
    assert not any(".head." in n for n, _ in encoder.named_parameters())
    block_modules = {
        n for p in encoder.block_prefixes() for n, _ in encoder.named_modules()
        if n.startswith(p + ".")
    }
    for suffix in encoder.lora_target_modules:
        assert sum(n.endswith(suffix) for n in block_modules) == config.num_hidden_layers


def test_fixed_preprocessing_matches_siglip_image_processor():
    from transformers import SiglipImageProcessor

    encoder = build("siglip2_base", tiny=True)
    size = encoder.preprocessing.size
    image = random_image(70, 45)
    reference = SiglipImageProcessor(size={"height": size[0], "width": size[1]})(
        images=[image], return_tensors="pt"
    )["pixel_values"][0]
    ours = encoder.preprocessing(image)["pixel_values"]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height, width", [(70, 45), (23, 190), (400, 300)])
def test_naflex_preprocessing_matches_siglip2_image_processor(height, width):
    from transformers import Siglip2ImageProcessor

    preprocessing = NaflexPreprocessing(patch_size=4, max_num_patches=64)
    image = random_image(height, width)
    ours = preprocessing(image)
    reference = Siglip2ImageProcessor(patch_size=4, max_num_patches=64)(
        images=[image], return_tensors="pt"
    )
    count = int(reference["pixel_attention_mask"][0].sum())
    assert ours["pixel_values"].shape == (count, 4 * 4 * 3)
    assert ours["pixel_attention_mask"].all()
    assert ours["spatial_shapes"].tolist() == reference["spatial_shapes"][0].tolist()
    assert int(ours["spatial_shapes"].prod()) == count <= 64
    torch.testing.assert_close(
        ours["pixel_values"], reference["pixel_values"][0, :count], atol=1e-5, rtol=0
    )


def test_naflex_describe_and_draft_bound():
    preprocessing = NaflexPreprocessing(patch_size=16, max_num_patches=1024)
    described = preprocessing.describe()
    assert described["max_num_patches"] == 1024 and described["patch_size"] == 16
    assert described["type"] == "NaflexPreprocessing"
    assert NaflexPreprocessing(patch_size=16, max_num_patches=256).describe() != described
    # every aspect-preserving resize fits: its short side is at most the bound, and its long
    # side is at most the bound times the image's own side ratio
    from transformers.models.siglip2.image_processing_siglip2 import (
        get_image_size_for_max_num_patches,
    )

    side = preprocessing.target_size[0]
    assert preprocessing.target_size == (side, side)
    for h, w in [(600, 800), (1000, 1000), (3000, 400), (123, 4567), (10, 10)]:
        th, tw = get_image_size_for_max_num_patches(h, w, 16, 1024)
        ratio = max(h, w) / min(h, w)
        assert min(th, tw) <= side
        assert max(th, tw) <= side * ratio


def test_naflex_batch_through_dataloader_workers():
    encoder = build("siglip2_naflex_base", tiny=True, max_num_patches=48).eval()
    preprocessing = encoder.preprocessing
    assert pickle.loads(pickle.dumps(preprocessing)) == preprocessing
    images = [random_image(30, 90), random_image(64, 40, seed=1)]  # wide, then tall
    expected = [preprocessing(image)["spatial_shapes"] for image in images]
    counts = [int(shape.prod()) for shape in expected]
    assert counts[0] != counts[1]  # different aspect ratios -> different patch counts
    loader = torch.utils.data.DataLoader(
        Images(images, preprocessing), batch_size=2, num_workers=2,
        collate_fn=preprocessing.collate,
    )
    (batch,) = list(loader)
    assert batch["spatial_shapes"].tolist() == [s.tolist() for s in expected]
    assert batch["pixel_values"].shape == (2, max(counts), 4 * 4 * 3)
    with torch.no_grad():
        out = encoder(**batch)
    assert out.tokens.shape == (2, max(counts), encoder.out_dim)
    assert out.mask.dtype == torch.bool
    assert out.mask.sum(dim=1).tolist() == counts
    short = counts.index(min(counts))
    assert not out.mask[short, min(counts):].any()
    assert torch.isfinite(out.tokens).all()


def test_naflex_padding_is_masked_out():
    encoder = build("siglip2_naflex_base", tiny=True, max_num_patches=48).eval()
    preprocessing = encoder.preprocessing
    batch = preprocessing.collate(
        [preprocessing(random_image(30, 90)), preprocessing(random_image(30, 30, seed=1))]
    )
    real = batch["pixel_attention_mask"]
    assert not real[1].all()  # the square image is padded
    noisy = dict(batch, pixel_values=batch["pixel_values"].clone())
    noisy["pixel_values"][~real] = 100.0
    with torch.no_grad():
        clean_out = encoder(**batch).tokens
        noisy_out = encoder(**noisy).tokens
        # without the mask the padding would leak into the real tokens
        unmasked = encoder(**dict(noisy, pixel_attention_mask=torch.ones_like(real))).tokens
    torch.testing.assert_close(noisy_out[real], clean_out[real])
    assert not torch.allclose(unmasked[1][real[1]], clean_out[1][real[1]], atol=1e-4)
    # the lone image's tokens do not depend on what it is batched with
    with torch.no_grad():
        alone = encoder(**preprocessing.collate([preprocessing(random_image(30, 30, seed=1))]))
    torch.testing.assert_close(alone.tokens[0], clean_out[1][real[1]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_identity_and_metadata(name):
    encoder = build(name, tiny=True)
    assert encoder.name == name
    assert encoder.weights == "random" and encoder.revision is None
    assert encoder.out_dim == encoder.model.config.hidden_size == 32
    assert encoder.lora_target_modules == ("q_proj", "k_proj", "v_proj")
    assert encoder.identity.startswith(f"{name}|random|main|")
    if "naflex" in name:
        other = build(name, tiny=True, max_num_patches=512)
        assert other.identity != encoder.identity


def save_full_checkpoint(name, directory):
    """A tiny text+vision model saved like the hub's checkpoints (head included)."""
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

    config_cls, model_cls = (
        (Siglip2Config, Siglip2Model) if "naflex" in name else (SiglipConfig, SiglipModel)
    )
    text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": 1}
    vision = dict(vision_config(name, tiny=True).to_dict(), vision_use_head=True)
    model = model_cls(config_cls(text_config=text, vision_config=vision))
    model.save_pretrained(directory)
    return model.vision_model.state_dict()


@pytest.mark.parametrize("name", ["siglip2_base", "siglip2_naflex_base"])
def test_loads_vision_tower_from_local_directory_without_head(name, tmp_path):
    saved = save_full_checkpoint(name, tmp_path)
    assert any(key.startswith("head.") for key in saved)
    encoder = build(name, weights=str(tmp_path))
    assert encoder.weights == str(tmp_path)
    assert not hasattr(encoder.model, "head")
    loaded = encoder.model.state_dict()
    assert set(loaded) == {key for key in saved if not key.startswith("head.")}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


def test_checkpoint_missing_vision_tensors_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    save_full_checkpoint("siglip2_base", tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors = load_file(path)
    del tensors["vision_model.post_layernorm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    expected = r"lacks 1 SiglipVisionModel tensors \(e\.g\. post_layernorm\.weight\)"
    with pytest.raises(WeightsError, match=expected):
        build("siglip2_base", weights=str(tmp_path))


def test_missing_weights_is_one_actionable_line(tmp_path):
    empty = tmp_path / "siglip"
    empty.mkdir()
    with pytest.raises(WeightsError) as excinfo:
        build("siglip2_base", weights=str(empty))
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"vision encoder 'siglip2_base': could not load weights '{empty}' (")
    assert message.endswith(
        "set params.weights to a weights file or a folder holding one, or set params.pretrained = false for random weights"
    )


def test_cls_pooling_is_refused():
    encoder = build("siglip2_so400m", tiny=True)
    cls = registry().get("pooling", "cls")
    with pytest.raises(ValueError, match="needs an encoder with a CLS token"):
        cls.factory(cls.params_cls(), encoder.out_dim, encoder.has_cls_token)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_pooled_naflex_vector_ignores_batch_padding(pooling):
    encoder = build("siglip2_naflex_base", tiny=True, max_num_patches=48).eval()
    registration = registry().get("pooling", pooling)
    pool = registration.factory(registration.params_cls(), encoder.out_dim, False).eval()
    preprocessing = encoder.preprocessing
    square = preprocessing(random_image(30, 30, seed=1))
    with torch.no_grad():
        pair = preprocessing.collate([preprocessing(random_image(30, 90)), square])
        batched = pool(*encoder(**pair))
        alone = pool(*encoder(**preprocessing.collate([square])))
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name, params",
    [
        ("siglip2_so400m", {"tiny": True}),
        ("siglip2_base", {"pretrained": False, "tiny": True}),
        ("siglip2_naflex_so400m", {"tiny": True, "max_num_patches": 64}),
        ("siglip2_naflex_base", {"pretrained": False, "tiny": True, "max_num_patches": 64}),
    ],
)
def test_contract(name, params):
    encoder = check_vision_encoder(name, params, registry=registry())
    assert encoder.name == name


class Uint8Images(Images):
    def __getitem__(self, index):
        return self.preprocessing.uint8_item(self.images[index])


def test_naflex_workers_hand_over_uint8_patches_that_normalise_to_the_float_path():
    encoder = build("siglip2_naflex_base", tiny=True, max_num_patches=48).eval()
    preprocessing = encoder.preprocessing
    assert preprocessing.uint8_pixels and not preprocessing.plain_resize  # uint8 loading, no decoded-image cache
    assert preprocessing.variable_axes == (("pixel_values", 1), ("pixel_attention_mask", 1))
    images = [random_image(30, 90), random_image(64, 40, seed=1)]
    loader = torch.utils.data.DataLoader(
        Uint8Images(images, preprocessing), batch_size=2, num_workers=2, collate_fn=preprocessing.collate,
    )
    (compact,) = list(loader)
    assert compact["pixel_values"].dtype == torch.uint8  # a quarter of float32's bytes through the workers
    floats = preprocessing.collate([preprocessing(image) for image in images])
    real = compact["pixel_attention_mask"]
    assert torch.equal(real, floats["pixel_attention_mask"])
    assert torch.equal(compact["spatial_shapes"], floats["spatial_shapes"])
    normalized = preprocessing.normalize(compact["pixel_values"])  # what the model does on the device
    assert normalized.dtype == torch.float32 and normalized.shape == floats["pixel_values"].shape
    torch.testing.assert_close(normalized[real], floats["pixel_values"][real], atol=1e-6, rtol=0)
    with torch.no_grad():
        ours = encoder(**{**compact, "pixel_values": normalized})
        reference = encoder(**floats)
    torch.testing.assert_close(ours.tokens[real], reference.tokens[real], atol=1e-5, rtol=1e-4)
