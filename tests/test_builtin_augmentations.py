"""Built-in image augmentations: PIL RGB in and out, same size, picklable, text not mirrored."""

import multiprocessing
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mmcore.builtin.augmentations import ResizedCropKeepSize
from mmcore.plugins.manager import make_registry
from mmcore.validators import FieldError


@pytest.fixture(scope="module")
def registry():
    return make_registry(load_entrypoints=False)


def build(registry, name, **params):
    registration = registry.get("augmentation", name)
    return registration.factory(registration.params_cls(**params))


def picture(width=96, height=64, mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def horizontal_ramp(width=400, height=100):
    """A banner whose red channel encodes x: 0 at the left edge, 255 at the right."""
    red = np.tile(np.linspace(0, 255, width), (height, 1)).astype(np.uint8)
    pixels = np.stack([red, np.full_like(red, 128), np.full_like(red, 128)], axis=-1)
    return Image.fromarray(pixels, "RGB")


def test_builtin_augmentations(registry):
    assert registry.names("augmentation") == ["none", "strong", "weak"]
    assert build(registry, "none") is None


@pytest.mark.parametrize("name", ["weak", "strong"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_output_is_an_rgb_image_of_the_same_size(registry, name, mode):
    augment = build(registry, name)
    image = picture(mode=mode)
    for seed in range(3):
        torch.manual_seed(seed)
        out = augment(image)
        assert isinstance(out, Image.Image)
        assert out.mode == "RGB"
        assert out.size == image.size


@pytest.mark.parametrize("name", ["weak", "strong"])
def test_random_but_reproducible_from_torch_seed(registry, name):
    augment = build(registry, name)
    image = picture()
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(np.asarray(augment(image)))
    assert np.array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])
    assert not np.array_equal(outputs[0], np.asarray(image))


@pytest.mark.parametrize("name", ["weak", "strong"])
def test_survives_pickling_for_loader_workers(registry, name):
    augment = build(registry, name)
    copy = pickle.loads(pickle.dumps(augment))
    image = picture()
    torch.manual_seed(3)
    expected = np.asarray(augment(image))
    torch.manual_seed(3)
    assert np.array_equal(np.asarray(copy(image)), expected)


def _apply_in_worker(augment, image):
    torch.manual_seed(5)
    return np.asarray(augment(image))


@pytest.mark.slow
def test_runs_in_a_spawned_process(registry):
    """DataLoader workers under 'spawn' (macOS, Windows, CUDA) receive the augmentation pickled."""
    augment = build(registry, "strong")
    image = picture()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_apply_in_worker, (augment, image))
    assert np.array_equal(result, _apply_in_worker(augment, image))


def test_weak_keeps_text_readable_on_a_wide_banner(registry):
    """No mirroring, and a 4:1 banner keeps most of its width (RandomResizedCrop's absolute
    3:4..4:3 aspect range would cut it down to a centre square-ish third)."""
    augment = build(registry, "weak", jitter=0.0)
    banner = horizontal_ramp()
    for seed in range(20):
        torch.manual_seed(seed)
        red = np.asarray(augment(banner))[:, :, 0].astype(float).mean(axis=0)
        assert red[-1] > red[0], "left and right swapped: the image was mirrored"
        assert red[-1] - red[0] > 0.8 * 255


def test_resized_crop_keeps_the_requested_area():
    crop = ResizedCropKeepSize(0.5, max_stretch=1.0)
    banner = horizontal_ramp(400, 100)
    for seed in range(20):
        torch.manual_seed(seed)
        red = np.asarray(crop(banner))[:, :, 0].astype(float).mean(axis=0)
        width_fraction = (red[-1] - red[0]) / 255
        # no stretch: the crop keeps the aspect, width fraction = sqrt(area) in [0.707, 1]
        assert 0.69 <= width_fraction <= 1.0


def test_strong_changes_more_than_weak(registry):
    image = picture(seed=1)
    base = np.asarray(image).astype(float)

    def mean_change(name):
        augment = build(registry, name)
        changes = []
        for seed in range(15):
            torch.manual_seed(seed)
            changes.append(np.abs(np.asarray(augment(image)).astype(float) - base).mean())
        return np.mean(changes)

    assert mean_change("strong") > mean_change("weak")


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("weak", {"crop_scale": 0.0}, "must be in [0.1, 1.0] (got 0.0)"),
        ("weak", {"jitter": 1.5}, "must be in [0.0, 1.0] (got 1.5)"),
        ("strong", {"hue": 0.7}, "must be in [0.0, 0.5] (got 0.7)"),
        ("strong", {"grayscale_p": -0.1}, "must be in [0.0, 1.0] (got -0.1)"),
    ],
)
def test_params_are_validated(registry, name, params, message):
    with pytest.raises(FieldError) as info:
        registry.get("augmentation", name).params_cls(**params)
    assert str(info.value) == message
