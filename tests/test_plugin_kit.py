"""The plugin-author kit: docs/plugins.md covers every hook, mmcore.testing's checks catch
broken components, and `mmcore new-plugin` writes a package that installs, passes its own
tests and trains in a recipe."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import attrs
import pytest
import tomllib
import torch
from click.testing import CliRunner

from mmcore import hookimpl, testing
from mmcore.cli.new_plugin import new_plugin_command
from mmcore.interfaces import EncoderParams, OcrEngine
from mmcore.plugins import hookspecs
from mmcore.plugins.manager import make_registry
from mmcore.plugins.registry import KINDS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "plugins.md"
HOOK_KIND = {hook: kind for kind, (hook, _, _) in KINDS.items()}
CHECKS = {
    "vision": testing.check_vision_encoder,
    "text": testing.check_text_encoder,
    "pooling": testing.check_pooling,
    "fusion": testing.check_fusion,
    "head": testing.check_head,
    "loss": testing.check_loss,
    "scheduler": testing.check_scheduler,
    "augmentation": testing.check_augmentation,
    "ocr": testing.check_ocr_engine,
}


# --- docs/plugins.md ---------------------------------------------------------------------


def hookspec_names():
    """Functions of mmcore.plugins.hookspecs marked with @hookspec."""
    return sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "mmcore_spec"))


def factory_signature(hook):
    """The ``factory(...) -> ...`` contract from the hookspec's docstring."""
    match = re.search(r"``(factory\(.*?)``", getattr(hookspecs, hook).__doc__, re.S)
    return " ".join(match.group(1).split())


def sections(markdown):
    """``{heading text: body}`` for every markdown heading."""
    parts = re.split(r"^#{1,6} +(.+)$", markdown, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def hook_problems(markdown):
    """One line per hook the docs miss: no heading naming it, or no factory signature under it."""
    found = sections(markdown)
    problems = []
    for hook in hookspec_names():
        heading = next((h for h in found if hook in h), None)
        if heading is None:
            problems.append(f"docs/plugins.md: no section for hook {hook} (add '### {hook}')")
        elif factory_signature(hook) not in " ".join(found[heading].split()):
            problems.append(f"docs/plugins.md: {hook}: missing its signature `{factory_signature(hook)}`")
    return problems


def example(hook):
    """The first python code block in the hook's section of docs/plugins.md."""
    body = sections(DOCS.read_text(encoding="utf-8"))[f"{hook}"]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_every_hookspec_has_a_docs_section_with_its_factory_signature():
    assert set(hookspec_names()) == set(HOOK_KIND)  # every registry kind has its hook
    assert hook_problems(DOCS.read_text(encoding="utf-8")) == []


def test_a_hook_missing_from_the_docs_is_reported():
    text = DOCS.read_text(encoding="utf-8")
    without = re.sub(r"^### register_heads$.*?(?=^### )", "", text, flags=re.S | re.M)
    assert hook_problems(without) == [
        "docs/plugins.md: no section for hook register_heads (add '### register_heads')"
    ]
    changed = text.replace("factory(params, in_dim) -> nn.Module", "factory(params) -> nn.Module")
    assert hook_problems(changed) == [
        "docs/plugins.md: register_heads: missing its signature `factory(params, in_dim) -> nn.Module`"
    ]


def load_module(name, source):
    module = types.ModuleType(name)
    exec(compile(source, f"<docs/plugins.md {name}>", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("hook", sorted(HOOK_KIND))
def test_docs_example_is_a_working_plugin(hook, monkeypatch):
    kind = HOOK_KIND[hook]
    module = load_module(f"docs_{kind}", example(hook))
    monkeypatch.setitem(sys.modules, module.__name__, module)  # importable: pickling needs it
    registry = make_registry(load_entrypoints=False, extra_plugins=[(f"docs-{kind}", module)])
    (registration,) = [r for r in registry.all() if r.package == f"docs-{kind}"]
    assert registration.kind == kind and attrs.has(registration.params_cls)
    if kind in ("vision", "text"):
        assert issubclass(registration.params_cls, EncoderParams)
    if kind == "ocr":
        pytest.importorskip("rapidocr_onnxruntime")
    CHECKS[kind](registration.name, {"tiny": True} if kind == "vision" else {}, registry=registry)


# --- mmcore.testing: built-ins pass, broken components fail with the rule they break -------

OTHER_KINDS = ("pooling", "fusion", "head", "loss", "scheduler", "augmentation")


@pytest.mark.parametrize(
    "kind,name",
    [(kind, name) for kind in OTHER_KINDS for name in make_registry(load_entrypoints=False).names(kind)],
)
def test_builtins_pass_their_checks(kind, name):
    builtins = make_registry(load_entrypoints=False)
    extra = {"has_cls_token": True} if kind == "pooling" else {}
    CHECKS[kind](name, {}, registry=builtins, **extra)


@attrs.frozen(kw_only=True)
class NoParams:
    pass


class IgnoresMask(torch.nn.Module):
    def forward(self, tokens, mask):
        return tokens.mean(dim=1)


class ColumnHead(torch.nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.linear = torch.nn.Linear(in_dim, 1)

    def forward(self, features):
        return self.linear(features)  # [B, 1]: the engine needs [B]


class VisionOnlyFusion(torch.nn.Module):
    out_dim = 8

    def forward(self, vision, text):
        return vision


class RewardsMistakes(torch.nn.Module):
    def forward(self, logits, targets):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, 1 - targets)


def counting_factor():
    """A learning-rate factor with hidden state in a closure: state_dict() cannot resume it."""
    calls = 0

    def factor(step):
        nonlocal calls
        calls += 1
        return 1.0 / calls

    return factor


class UnseededNoise:
    def __call__(self, image):
        import numpy as np
        from PIL import Image

        noise = np.random.default_rng().integers(0, 20, size=(image.height, image.width, 3))
        return Image.fromarray((np.asarray(image) // 2 + noise).astype("uint8"))


class SilentOcr(OcrEngine):
    name = "silent"

    def read(self, image, lang):
        return None


def broken_plugin():
    module = types.ModuleType("broken")

    @hookimpl
    def register_poolings(register):
        register("ignores_mask", lambda params, dim, has_cls: IgnoresMask(), NoParams)

    @hookimpl
    def register_heads(register):
        register("column", lambda params, in_dim: ColumnHead(in_dim), NoParams)

    @hookimpl
    def register_fusions(register):
        register("vision_only", lambda params, vision_dim, text_dim: VisionOnlyFusion(), NoParams)

    @hookimpl
    def register_losses(register):
        register("rewards_mistakes", lambda params, counts: RewardsMistakes(), NoParams)

    @hookimpl
    def register_schedulers(register):
        def build(params, optimizer, total_steps):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, counting_factor())

        register("hidden_state", build, NoParams)

    @hookimpl
    def register_augmentations(register):
        register("unseeded", lambda params: UnseededNoise(), NoParams)

    @hookimpl
    def register_ocr_engines(register):
        register("silent", lambda params: SilentOcr(), NoParams)

    for function in (register_poolings, register_heads, register_fusions, register_losses,
                     register_schedulers, register_augmentations, register_ocr_engines):
        setattr(module, function.__name__, function)
    return module


@pytest.mark.parametrize(
    "kind,name,message",
    [
        ("pooling", "ignores_mask", "ignores_mask: padded tokens change the result; is the mask applied?"),
        ("head", "column", "column: expected [2] (got [2, 1])"),
        ("fusion", "vision_only", "vision_only: no gradient reaches input 1"),
        ("loss", "rewards_mistakes", "rewards_mistakes: right answers cost"),
        ("scheduler", "hidden_state", "hidden_state: a resumed schedule gives other rates"),
        ("augmentation", "unseeded", "unseeded: the same torch seed gave different images; use torch's RNG"),
        ("ocr", "silent", "silent: read() must return a str (got NoneType)"),
    ],
)
def test_checks_name_the_broken_rule(kind, name, message):
    registry = make_registry(load_entrypoints=False, extra_plugins=[("broken", broken_plugin())])
    with pytest.raises(AssertionError) as info:
        CHECKS[kind](name, {}, registry=registry)
    assert str(info.value).startswith(message)


def test_ocr_check_reads_rendered_text():
    if not Path("/usr/bin/tesseract").exists() and not any(
        (Path(p) / "tesseract").exists() for p in os.environ.get("PATH", "").split(os.pathsep)
    ):
        pytest.skip("tesseract is not installed (scripts/install-ocr-deps.sh)")
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 40)
    except OSError:
        pytest.skip("DejaVu fonts are not installed (fonts-dejavu-core)")
    image = Image.new("RGB", (360, 80), "white")
    ImageDraw.Draw(image).text((10, 15), "SALE 50", fill="black", font=font)
    testing.check_ocr_engine("tesseract", {}, lang="eng", image=image, expected="SALE 50")
    with pytest.raises(AssertionError, match="expected 'BUY NOW' in"):
        testing.check_ocr_engine("tesseract", {}, lang="eng", image=image, expected="BUY NOW")


# --- mmcore new-plugin ---------------------------------------------------------------------


def new_plugin(*args):
    return CliRunner().invoke(new_plugin_command, [str(a) for a in args], catch_exceptions=False)


def import_file(module_name, path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_new_plugin_writes_the_default_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = new_plugin("my_net", "--kind", "vision")
    assert result.exit_code == 0, result.output
    root = tmp_path / "plugins" / "vision-my-net"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        ".gitignore",
        "README.md",
        "pyproject.toml",
        "src/mmcore_vision_my_net/__init__.py",
        "tests/test_vision_my_net.py",
    ]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "mmcore-vision-my-net"
    assert project["project"]["entry-points"] == {"mmcore": {"mmcore-vision-my-net": "mmcore_vision_my_net"}}
    assert project["tool"]["setuptools"]["packages"]["find"] == {"where": ["src"]}
    for path in root.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), f"{path}: unfilled placeholder"
    assert 'name = "my_net"' in (root / "README.md").read_text()
    assert result.output.splitlines()[0] == (
        "wrote plugins/vision-my-net/ (mmcore-vision-my-net, module mmcore_vision_my_net, vision encoder 'my_net')"
    )
    assert "  pip install -e plugins/vision-my-net" in result.output.splitlines()


@pytest.mark.parametrize("kind", ["vision", "text"])
def test_generated_module_passes_the_contract_before_install(tmp_path, kind):
    result = new_plugin("kit_check", "--kind", kind, "--dir", tmp_path / "pkg")
    assert result.exit_code == 0, result.output
    module_name = f"mmcore_{kind}_kit_check"
    module = import_file(module_name, tmp_path / "pkg" / "src" / module_name / "__init__.py")
    registry = make_registry(load_entrypoints=False, extra_plugins=[("generated", module)])
    registration = registry.get(kind, "kit_check")
    params_cls = registration.params_cls
    assert issubclass(params_cls, EncoderParams) and params_cls.__attrs_attrs__  # frozen attrs subclass
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        params_cls().tiny = True
    check = testing.check_vision_encoder if kind == "vision" else testing.check_text_encoder
    tiny = check("kit_check", {"tiny": True}, registry=registry)
    full = check("kit_check", {}, registry=registry)  # the defaults work as they are
    if kind == "vision":
        assert (tiny.out_dim, len(tiny.blocks()), full.out_dim, len(full.blocks())) == (8, 2, 32, 3)
        assert full.preprocessing.size == (64, 64)
    else:
        assert (tiny.out_dim, full.out_dim) == (16, 64)


@pytest.mark.parametrize("name", ["MyNet", "my-net", "_net", "net_", "my__net", "ünet", "my net"])
def test_new_plugin_refuses_a_bad_name_in_one_line(tmp_path, name):
    result = CliRunner().invoke(new_plugin_command, [name, "--kind", "vision", "--dir", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert result.output == (
        f"new-plugin: name {name!r} must be lowercase letters and digits, words joined by single "
        f"underscores (like my_encoder): it becomes the component name in recipes\n"
    )
    assert not (tmp_path / "x").exists()


def test_new_plugin_refuses_to_overwrite_a_folder(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    result = new_plugin("mine", "--kind", "text", "--dir", target)
    assert result.exit_code == 2
    assert result.output == f"new-plugin: {target} already exists; remove it or choose another --dir\n"
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert new_plugin("mine", "--kind", "text", "--dir", empty).exit_code == 0
    assert (empty / "src" / "mmcore_text_mine" / "__init__.py").is_file()


def test_new_plugin_warns_when_the_name_is_taken(tmp_path):
    # mmcore-fake-encoders (installed for the tests) registers fake_cnn
    result = new_plugin("fake_cnn", "--kind", "vision", "--dir", tmp_path / "pkg")
    assert result.exit_code == 0
    assert (
        "note: vision encoder 'fake_cnn' is already registered by mmcore-fake-encoders; "
        "installing both is an error — rename it or uninstall mmcore-fake-encoders"
    ) in result.output.splitlines()
    assert "note:" not in new_plugin("fresh_name", "--kind", "vision", "--dir", tmp_path / "other").output


def test_new_plugin_as_a_standalone_command_fails_in_one_line(tmp_path):
    code = "from mmcore.cli.new_plugin import new_plugin_command; new_plugin_command()"
    result = subprocess.run(
        [sys.executable, "-c", code, "Bad", "--kind", "vision"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "new-plugin: name 'Bad' must be lowercase letters and digits, words joined by single "
        "underscores (like my_encoder): it becomes the component name in recipes"
    ]
    assert list(tmp_path.iterdir()) == []


RECIPE = """
experiment = "kit"
seed = 1
[data]
base_dir = "{data}"
num_workers = 0
[vision]
name = "kit_conv"
params = {{ width = 8, depth = 2, image_size = 32 }}
[text]
name = "kit_words"
params = {{ dim = 16, buckets = 512 }}
[pooling]
name = "mean"
[fusion]
name = "gated"
params = {{ dim = 16 }}
[head]
name = "mlp"
params = {{ hidden = [16] }}
[train]
epochs = 1
batch_size = 16
learning_rate = 0.003
[cache]
enabled = false
[logging]
progress = false
tensorboard = false
"""


@pytest.mark.slow
def test_generated_plugins_install_pass_their_tests_and_train(tmp_path, demo_data):
    """Generate a vision plugin (the standalone command) and a text plugin, pip install them into
    a private folder (not the shared venv, so parallel tests never see them), run their own
    tests, then train a recipe that names both."""
    code = "from mmcore.cli.new_plugin import new_plugin_command; new_plugin_command()"
    subprocess.run([sys.executable, "-c", code, "kit_conv", "--kind", "vision"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    text_dir = tmp_path / "plugins" / "text-kit-words"
    assert new_plugin("kit_words", "--kind", "text", "--dir", text_dir).exit_code == 0
    vision_dir = tmp_path / "plugins" / "vision-kit-conv"
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "-q", "--target", str(site), str(vision_dir), str(text_dir)]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert {p.name for p in site.glob("*.dist-info")} == {
        "mmcore_vision_kit_conv-0.1.0.dist-info", "mmcore_text_kit_words-0.1.0.dist-info"
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "MMCORE_CACHE_DIR": str(tmp_path / "cache"),
        # only these two (and the built-ins): fast, and proves they load through their entry points
        "MMCORE_LOAD_PLUGINS": "mmcore-vision-kit-conv,mmcore-text-kit-words",
    }

    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", vision_dir / "tests", text_dir / "tests"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"\b11 passed\b", tests.stdout), tests.stdout

    recipe = tmp_path / "kit.toml"
    recipe.write_text(RECIPE.format(data=demo_data))
    run = subprocess.run(
        [sys.executable, "-m", "mmcore", "run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "run"
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_trained"] == 1 and 0.0 <= results["test"]["at_threshold"]["auroc"] <= 1.0
    assert len(json.loads((out / "test_predictions.json").read_text())) == 32
    ckpt = torch.load(out / "checkpoint_best.ckpt", weights_only=True)
    assert ckpt["encoders"]["vision"].startswith("kit_conv|random|")
    assert ckpt["encoders"]["text"].startswith("kit_words|random|")
    assert "vision.net.blocks.1.conv.weight" in ckpt["model"]
