"""The ``imagestats`` encoder: each histogram as numpy computes it, nothing to train, refused when asked to."""

import math

import numpy as np
import pytest
import torch

from mmcore import RecipeError
from mmcore.testing import build, check_vision_encoder, get_registry, structure

LUMA = np.array([0.299, 0.587, 0.114])


def test_entry_point_registers_imagestats():
    assert get_registry().get("vision", "imagestats").package == "mmcore-vision-imagestats"


def test_contract_of_a_fixed_extractor():
    encoder = check_vision_encoder("imagestats", {"size": 32})
    assert encoder.out_dim == 888 and not encoder.trainable
    assert list(encoder.parameters()) == []


def _blocks(encoder, pixels):
    """The encoder's output cut back into its blocks, squared: the histograms themselves."""
    from mmcore_vision_imagestats import BLOCKS

    out = encoder(pixel_values=pixels).tokens[:, 0].double() * math.sqrt(len(encoder.params.features))
    sizes = [BLOCKS[name] for name in encoder.params.features]
    return dict(zip(encoder.params.features, (part.square() for part in out.split(sizes, dim=1))))


def test_a_two_colour_image_gives_the_histograms_by_hand():
    encoder = build("vision", "imagestats", {"size": 16})
    pixels = torch.ones(1, 3, 16, 16)  # white ...
    pixels[:, 1:, :, :8] = 0.0  # ... with a red left half
    blocks = _blocks(encoder, pixels)
    color4 = np.zeros(64)
    color4[3 * 16] = color4[63] = 0.5  # red (3, 0, 0) and white (3, 3, 3)
    np.testing.assert_allclose(blocks["color4"][0].numpy(), color4, atol=1e-6)
    assert blocks["color8"][0, 7 * 64].item() == pytest.approx(0.5) and blocks["color8"][0, 511].item() == pytest.approx(0.5)
    saturation = np.zeros(8)
    saturation[0] = saturation[7] = 0.5  # white: 0, red: 1
    np.testing.assert_allclose(blocks["saturation"][0].numpy(), saturation, atol=1e-6)
    # one vertical edge: every gradient points along x, so all the orientation weight is in bin 0
    assert blocks["orientation"][0, 0].item() > 0.99
    # the edge runs down the middle: its energy sits in the two middle columns of the 4 x 4 layout
    layout = blocks["layout"][0].reshape(4, 4)
    assert layout[:, 1:3].sum().item() > 0.99 and layout[:, 1].sum() > 0.0


def _lbp_numpy(gray):
    h, w = gray.shape
    centre = gray[1:-1, 1:-1]
    code = np.zeros_like(centre, dtype=int)
    for bit, (oy, ox) in enumerate(((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))):
        code |= (gray[1 + oy : h - 1 + oy, 1 + ox : w - 1 + ox] >= centre + 0.5 / 255).astype(int) << bit
    return np.bincount(code.ravel(), minlength=256) / code.size


def test_gray_gradient_and_lbp_histograms_equal_numpy_on_a_random_image():
    encoder = build("vision", "imagestats", {"size": 24, "features": ["gray", "gradient", "lbp"]})
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24, 3)).astype(np.float32) / 255
    blocks = _blocks(encoder, torch.from_numpy(image).permute(2, 0, 1)[None])
    gray = (image * LUMA.astype(np.float32)).sum(-1, dtype=np.float32)
    np.testing.assert_allclose(blocks["gray"][0].numpy(), np.bincount(np.minimum((gray * 16).astype(int), 15).ravel(), minlength=16) / gray.size, atol=1e-6)
    dx, dy = gray[:-1, 1:] - gray[:-1, :-1], gray[1:, :-1] - gray[:-1, :-1]
    levels = np.minimum((np.sqrt(np.hypot(dx, dy) / 1.5) * 8).astype(int), 7)
    np.testing.assert_allclose(blocks["gradient"][0].numpy(), np.bincount(levels.ravel(), minlength=8) / levels.size, atol=1e-6)
    np.testing.assert_allclose(blocks["lbp"][0].numpy(), _lbp_numpy(gray), atol=1e-6)


def test_the_vector_has_unit_norm_and_a_flat_render_differs_from_noise():
    encoder = build("vision", "imagestats", {"size": 32})
    flat = torch.zeros(1, 3, 32, 32)
    flat[:, :, 8:12, 4:28] = 1.0  # a white bar on black: few colours, straight edges
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = encoder(pixel_values=torch.cat([flat, noise])).tokens[:, 0]
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert torch.dot(out[0], out[1]) < 0.5  # histograms far apart


def test_an_image_gives_the_same_vector_alone_and_in_a_batch():
    encoder = build("vision", "imagestats", {"size": 32})
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    together = encoder(pixel_values=pixels).tokens
    for i in range(3):
        torch.testing.assert_close(encoder(pixel_values=pixels[i : i + 1]).tokens, together[i : i + 1])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"size": 8}, r"vision\.params\.size: must be a whole number of pixels >= 16 \(got 8\)"),
        ({"features": ["color4", "edges"]}, r"vision\.params\.features: unknown block 'edges'; choose from color4, color8"),
        ({"features": []}, r"vision\.params\.features: name at least one of"),
        ({"features": ["lbp", "lbp"]}, r"vision\.params\.features: names a block twice"),
        ({"pretrained": True}, r"vision\.params\.pretrained: this encoder has no pretrained weights"),
    ],
)
def test_bad_params_name_their_key(params, message):
    from mmcore_vision_imagestats import ImageStatsParams

    with pytest.raises(RecipeError, match=message):
        structure(params, ImageStatsParams, source="r.toml", path="vision.params")
