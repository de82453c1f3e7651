"""Component protocols in code: what the engine sends a pooling is what the contract checks send, a
plugin's bug is one line naming it, traits are declared once and checked, and the model and the
engine probe no component with getattr/hasattr."""

import ast
import os
import sys
import warnings
from pathlib import Path

import attrs
import pytest
import torch
from test_plugin_kit import example, load_module

from mmcore import AugmentationTraits, Fusion, FusionOutput, MmcoreError, Pooling, VisionTraits, hookimpl, testing
from mmcore.plugins.manager import make_registry
from mmcore.plugins.registry import ComponentError

REPO = Path(__file__).resolve().parents[1]


@attrs.frozen(kw_only=True)
class NoParams:
    pass


def registry_with(*plugins):
    """Built-ins, the fake encoders and ``plugins`` ((name, module) pairs), registered explicitly."""
    import mmcore_fake_encoders

    return make_registry(load_entrypoints=False, extra_plugins=[("fake", mmcore_fake_encoders), *plugins])


def run(recipe, registry, out):
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    return run_training(load_recipe(recipe, registry=registry), recipe_path=recipe, out=out, registry=registry,
                        progress=False, echo=lambda *args, **kwargs: None)


# --- the pooling contract is what the engine sends ------------------------------------------------


def test_a_pooling_with_parameters_written_from_the_docs_trains_on_cached_float16_tokens(tiny_recipe, tmp_path, monkeypatch):
    """The docs' pooling (one nn.Linear gate), as a plugin, on a frozen fixed-resolution encoder: its
    tokens are cached (float16, all of one length, so no mask) and reach the pooling as they are."""
    import json

    module = load_module("docs_gated_pooling", example("register_poolings"))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    seen = []
    forward = module.GatedMaxPooling.forward

    def recorded(self, tokens, mask=None):
        seen.append((tokens.dtype, mask is None))
        return forward(self, tokens, mask)

    monkeypatch.setattr(module.GatedMaxPooling, "forward", recorded)
    registry = registry_with(("docs-pooling", module))
    recipe = tiny_recipe(pooling={"name": "gated_max"}, train={"epochs": 2}, cache={"dir": str(tmp_path / "cache")})
    out = run(recipe, registry, tmp_path / "run")
    results = json.loads((out / "results.json").read_text())
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert results["epochs_trained"] == 2 and results["feature_cache"]["vision"] is True
    assert results["trainable_parameters"]["pooling"] == {"trainable": 9, "total": 9}  # the gate: Linear(8, 1)
    # training, validation, test: cached float16 tokens with mask=None; the report's saliency runs the
    # encoder on pixels (float32 tokens, the encoder's mask)
    assert seen.count((torch.float16, True)) >= 2 * 4 + 2 * 2 + 2 and set(seen) <= {(torch.float16, True), (torch.float32, False)}


def _naive_gated_max(handles_none):
    """The issue's pooling: a learned gate, then a max that assumes a mask (and float32 tokens)."""

    class NaiveGatedMax(Pooling):
        def __init__(self, dim):
            super().__init__()
            self.gate = torch.nn.Linear(dim, 1)

        def forward(self, tokens, mask=None):
            gated = tokens * torch.sigmoid(self.gate(tokens))
            if mask is not None or not handles_none:
                gated = gated.masked_fill(~mask.unsqueeze(-1), float("-inf"))
            return gated.amax(dim=1)

    class Plugin:
        @hookimpl
        def register_poolings(register):
            register("naive", lambda params, dim, has_cls: NaiveGatedMax(dim), NoParams)

    return Plugin


@pytest.mark.parametrize("handles_none,message", [
    (False, "naive: fails on mask=None (every token is real): AttributeError: 'NoneType' object has no attribute 'unsqueeze'"),
    (True, "naive: fails on float16 tokens with mask=None, as cached tokens of one length arrive: "
           "RuntimeError: mat1 and mat2 must have the same dtype, but got Half and Float"),
])
def test_the_pooling_check_sends_no_mask_and_float16_as_the_engine_does(handles_none, message):
    registry = make_registry(load_entrypoints=False, extra_plugins=[("naive", _naive_gated_max(handles_none))])
    with pytest.raises(AssertionError) as info:
        testing.check_pooling("naive", {}, registry=registry)
    assert str(info.value) == message


# --- a plugin's bug is one line naming it ---------------------------------------------------------

BUGGY_PLUGIN = '''
import attrs
import torch

from mmcore import Pooling, hookimpl


@attrs.frozen(kw_only=True)
class BuggyParams:
    fails: str = "forward"


class BuggyPooling(Pooling):
    def __init__(self, dim):
        super().__init__()
        self.gate = torch.nn.Linear(dim, 1)

    def forward(self, tokens, mask=None):
        return (tokens * self.gate(tokens.float())).masked_fill(~mask.unsqueeze(-1), 0).amax(dim=1)


def build_buggy(params, dim, has_cls_token):
    if params.fails == "build":
        return {}["dim"]
    return BuggyPooling(dim)


@hookimpl
def register_poolings(register):
    register("buggy", build_buggy, BuggyParams)
'''


def installed_plugin(site, dist, source):
    """A plugin package as pip leaves it: its module and a dist-info with its ``mmcore`` entry point."""
    module = dist.replace("-", "_")
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(source, encoding="utf-8")
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[mmcore]\n{dist} = {module}\n", encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "MMCORE_LOAD_PLUGINS": f"mmcore-fake-encoders,{dist}"}


@pytest.mark.parametrize("fails,line", [
    ("build", "pooling 'buggy' (package mmcore-pooling-buggy) failed to build: KeyError: 'dim'"),
    ("forward", "pooling 'buggy' (package mmcore-pooling-buggy) failed on the first batch: "
                "AttributeError: 'NoneType' object has no attribute 'unsqueeze'"),
])
def test_a_component_that_raises_is_one_line_naming_it_its_kind_and_its_package(cli, tiny_recipe, tmp_path, fails, line):
    env = installed_plugin(tmp_path / "site", "mmcore-pooling-buggy", BUGGY_PLUGIN)
    recipe = tiny_recipe(pooling={"name": "buggy", "params": {"fails": fails}}, cache={"dir": str(tmp_path / "cache")})
    result = cli("run", recipe, "--out", tmp_path / "run", "--quiet", env=env, check=False)
    assert (result.returncode, result.stderr.splitlines()) == (1, [line])


def test_an_exception_outside_every_component_keeps_its_traceback():
    from mmcore.plugins.build import reported_failures

    pooling = torch.nn.Linear(2, 2)
    with pytest.raises(ComponentError, match=r"^pooling 'p' \(package q\) failed here: RuntimeError: mat1 and mat2"):
        with reported_failures({pooling: "pooling 'p' (package q)"}, "here"):
            pooling(torch.zeros(1, 3))
    with pytest.raises(ZeroDivisionError):  # the engine's own bug: not blamed on a plugin
        with reported_failures({pooling: "pooling 'p' (package q)"}, "here"):
            pooling(torch.zeros(1, 2))
            1 / 0
    assert not pooling._forward_hooks and not pooling._forward_pre_hooks


# --- traits: declared once, checked against the built component ------------------------------------


def _vision_plugin(traits=None, params_attrs=None):
    """fake_cnn (no CLS token) registered as ``cnn`` with ``traits``, its params class carrying ``params_attrs``."""
    import mmcore_fake_encoders

    params_cls = attrs.make_class("OldParams", {}, bases=(mmcore_fake_encoders.FakeVisionParams,), frozen=True, kw_only=True)
    for name, value in (params_attrs or {}).items():
        setattr(params_cls, name, value)

    class Plugin:
        @hookimpl
        def register_vision_encoders(register):
            register("cnn", mmcore_fake_encoders.FakeCnn, params_cls, **({} if traits is None else {"traits": traits}))

    return Plugin


def test_an_encoder_that_disagrees_with_its_traits_fails_the_contract_and_the_build(registry):
    from mmcore.model.components import build_component
    from mmcore.recipe.schema import Component

    plugins = make_registry(load_entrypoints=False, extra_plugins=[("liar", _vision_plugin(VisionTraits(has_cls_token=True)))])
    with pytest.raises(AssertionError) as info:
        testing.check_vision_encoder("cnn", {"width": 8}, registry=plugins)
    problem = "registered with traits has_cls_token=True, but the built encoder has has_cls_token = False; make the two agree"
    assert str(info.value) == f"cnn: {problem}"
    params = plugins.get("vision", "cnn").params_cls(width=8)
    with pytest.raises(ComponentError) as info:
        build_component(plugins, "vision", Component(name="cnn", params=params))
    assert str(info.value) == f"vision encoder 'cnn' (package liar): {problem}"


def test_traits_of_the_wrong_kind_are_refused_at_registration():
    class Plugin:
        @hookimpl
        def register_poolings(register):
            register("p", lambda params, dim, cls: None, NoParams, traits=VisionTraits())

    with pytest.raises(MmcoreError) as info:
        make_registry(load_entrypoints=False, extra_plugins=[("wrong", Plugin)])
    assert str(info.value) == "wrong: pooling 'p': poolings declare no traits (got traits=VisionTraits(has_cls_token=None, trainable=True))"
    with pytest.raises(MmcoreError) as info:
        make_registry(load_entrypoints=False, extra_plugins=[("wrong", _vision_plugin(AugmentationTraits()))])
    assert str(info.value) == (
        "wrong: vision encoder 'cnn': traits must be a VisionTraits or a function of the params returning one "
        "(got AugmentationTraits)"
    )


def test_traits_that_depend_on_the_params_are_a_function_of_them():
    plugin = _vision_plugin(lambda params: VisionTraits(has_cls_token=params.width > 8))
    registration = make_registry(load_entrypoints=False, extra_plugins=[("p", plugin)]).get("vision", "cnn")
    assert registration.traits_for(registration.params_cls(width=16)).has_cls_token is True
    assert registration.traits_for(registration.params_cls(width=8)).has_cls_token is False


def test_a_plugin_declaring_nothing_has_its_old_attributes_read_once_with_a_deprecation_warning(tiny_recipe, recipe_file):
    """has_cls_token / trainable on the params class (an attribute or a property), as plugins said it before traits."""
    from mmcore.recipe import load_recipe

    old = _vision_plugin(params_attrs={"has_cls_token": False, "trainable": False})
    with pytest.warns(DeprecationWarning) as caught:
        registry = registry_with(("mmcore-vision-old", old))
    assert [str(w.message) for w in caught] == [
        "mmcore-vision-old: vision encoder 'cnn' declaring has_cls_token, trainable on its params class is deprecated "
        "and will stop being read; pass register(..., traits=VisionTraits(...)) (see docs/plugins.md, Traits)"
    ]
    assert registry.get("vision", "cnn").traits == VisionTraits(has_cls_token=False, trainable=False)
    with pytest.raises(MmcoreError) as info:  # the fixed extractor asked to train: refused at load, as before
        load_recipe(tiny_recipe(vision={"name": "cnn"}, train={"freeze_backbone": False}), registry=registry)
    assert str(info.value).endswith("train.freeze_backbone: vision encoder 'cnn' is a fixed feature extractor with "
                                    "nothing to train (got false); use freeze_backbone = true, finetune_layers = 0 and no LoRA")
    depends = _vision_plugin(params_attrs={"has_cls_token": property(lambda params: params.width > 8)})
    with pytest.warns(DeprecationWarning):
        registration = registry_with(("mmcore-vision-old", depends)).get("vision", "cnn")
    # what it does not say (trainable) is left to the built encoder, as before traits
    assert registration.traits_for(registration.params_cls(width=16)) == VisionTraits(has_cls_token=True, trainable=None)
    assert registration.traits_for(registration.params_cls(width=8)) == VisionTraits(has_cls_token=False, trainable=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared traits, or nothing at all to read: nothing warns
        registry_with(("mmcore-vision-new", _vision_plugin(VisionTraits(has_cls_token=False))))
        silent = registry_with(("mmcore-vision-silent", _vision_plugin())).get("vision", "cnn")
    assert silent.traits == VisionTraits(has_cls_token=None, trainable=None)  # the built encoder says


def test_an_augmentation_declaring_keeps_size_on_its_class_is_read_when_built(registry):
    from mmcore.model.components import build_with_traits
    from mmcore.recipe.schema import Component

    class OldCrop:
        keeps_size = True

        def __call__(self, image):
            return image

    class Plugin:
        @hookimpl
        def register_augmentations(register):
            register("old_crop", lambda params: OldCrop(), NoParams)

    plugins = registry_with(("mmcore-augment-old", Plugin))
    with pytest.warns(DeprecationWarning, match=r"^mmcore-augment-old: augmentation 'old_crop' declaring keeps_size on its class"):
        built, traits = build_with_traits(plugins, "augmentation", Component(name="old_crop", params=NoParams()))
    assert isinstance(built, OldCrop) and traits == AugmentationTraits(keeps_size=True)
    assert build_with_traits(plugins, "augmentation", Component(name="weak", params=plugins.get("augmentation", "weak").params_cls()))[1] == (
        AugmentationTraits(keeps_size=True)
    )


def test_a_fusion_written_before_fusionoutput_still_works_with_a_deprecation_warning(registry):
    """A plain module returning the fused tensor: the classifier reads it as FusionOutput(fused)."""
    from mmcore.model.classifier import Classifier
    from mmcore.model.components import build_component
    from mmcore.recipe.schema import Component

    class Sum(torch.nn.Module):
        out_dim = 4

        def forward(self, vision, text):
            return vision + text

    class Plugin:
        @hookimpl
        def register_fusions(register):
            register("sum", lambda params, vision_dim, text_dim: Sum(), NoParams)

    plugins = registry_with(("mmcore-fusion-old", Plugin))
    with pytest.warns(DeprecationWarning, match=r"^mmcore-fusion-old: fusion 'sum' returning a tensor \(not an mmcore.Fusion\)"):
        fusion = build_component(plugins, "fusion", Component(name="sum", params=NoParams()), 4, 4)
    head = torch.nn.Linear(4, 1)
    model = Classifier(modality="multimodal", vision=None, pooling=None, text=None, projection=None, fusion=fusion,
                       head=torch.nn.Sequential(head, torch.nn.Flatten(0)))
    batch = {"vision_feature": torch.randn(3, 4), "text_feature": torch.randn(3, 4)}
    out = model(batch)
    assert isinstance(model.fuse(batch["vision_feature"], batch["text_feature"]), FusionOutput) and out.aux is None
    torch.testing.assert_close(out.logit, head(batch["vision_feature"] + batch["text_feature"]).reshape(-1))
    assert not isinstance(fusion, Fusion)


# --- no probing of components in the model and the engine -----------------------------------------

#: attribute names of the component protocols (and of what they replaced)
PROTOCOL_NAMES = {
    "aux_weight", "detach_combination", "initialize_head", "init_head", "auxiliary_logits", "last_gate", "gate",
    "aux_logits", "keeps_size", "has_cls_token", "trainable", "channels_last", "fits_on_train",
    "supports_gradient_checkpointing", "enable_gradient_checkpointing", "out_dim",
}


def protocol_probes(source, where):
    """``where:line: getattr(..., 'name')`` for each getattr/hasattr of a protocol name in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in PROTOCOL_NAMES):
            found.append(f"{where}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_the_model_and_the_engine_read_component_protocols_without_getattr():
    found = []
    for folder in ("model", "engine"):
        for path in sorted((REPO / "mmcore" / folder).rglob("*.py")):
            found += protocol_probes(path.read_text(encoding="utf-8"), path.relative_to(REPO))
    assert found == []


def test_the_scan_finds_a_probe():
    source = "x = getattr(fusion, 'aux_weight', 0.0)\nif hasattr(encoder, 'has_cls_token'):\n    pass\ngetattr(a, 'name')\n"
    assert protocol_probes(source, "m.py") == ["m.py:1: getattr(..., 'aux_weight')", "m.py:2: hasattr(..., 'has_cls_token')"]
