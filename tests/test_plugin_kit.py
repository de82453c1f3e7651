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

from mmcore import (
    NO_WEIGHTS,
    EncoderParams,
    FeatureMapEncoder,
    NoWeightsParams,
    OcrEngine,
    TextEncoder,
    calibrate_batchnorm,
    hookimpl,
    square_preprocessing,
    testing,
    torchvision_preprocessing,
)
from mmcore.cli.new_plugin import new_plugin_command
from mmcore.kit.health import feature_problem
from mmcore.plugins import hookspecs
from mmcore.plugins.kinds import KIND_TABLE
from mmcore.plugins.manager import make_registry

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "plugins.md"
HOOK_KIND = {kind.hook: kind.name for kind in KIND_TABLE}
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


# --- plugins use mmcore's face only ------------------------------------------------------

PUBLIC_MODULES = {"mmcore", "mmcore.testing"}


def private_imports(source, where):
    """``where:line: module`` for each import of mmcore other than its face, and each face name that does not exist."""
    import ast

    import mmcore

    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [(node.module, [alias.name for alias in node.names])]
        else:
            continue
        for module, names in modules:
            if module.split(".")[0] != "mmcore":
                continue
            if module not in PUBLIC_MODULES:
                problems.append(f"{where}:{node.lineno}: imports private module {module}")
            elif module == "mmcore":
                problems += [f"{where}:{node.lineno}: mmcore has no public name {n}" for n in names if n not in mmcore.__all__]
    return problems


def template_sources():
    """``{label: python source}`` of every file new-plugin writes, for every kind and template."""
    from mmcore.commands.new_plugin import TEMPLATES, plugin_files, plugin_names

    sources = {}
    for template, kind in TEMPLATES:
        names = plugin_names("face_check", kind, template=template)
        for relative, text in plugin_files(names).items():
            if relative.endswith(".py"):
                sources[f"new-plugin --from {template} --kind {kind}: {relative}"] = text
    return sources


def test_plugins_and_templates_import_only_mmcores_face():
    files = sorted((REPO / "plugins").glob("*/**/*.py"))
    assert len(files) >= 18  # every shipped plugin's module and tests
    problems = []
    for path in files:
        problems += private_imports(path.read_text(encoding="utf-8"), path.relative_to(REPO))
    for label, source in template_sources().items():
        problems += private_imports(source, label)
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)):
        problems += private_imports(block, f"docs/plugins.md python block {i + 1}")
    assert problems == []


def test_a_private_import_is_reported():
    source = "import attrs\nfrom mmcore import hookimpl, Nope\nfrom mmcore.kit.vision import FeatureMapEncoder\nimport mmcore.errors\n"
    assert private_imports(source, "p.py") == [
        "p.py:2: mmcore has no public name Nope",
        "p.py:3: imports private module mmcore.kit.vision",
        "p.py:4: imports private module mmcore.errors",
    ]


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
    changed = text.replace("factory(params, in_dim) -> mmcore.Head", "factory(params) -> mmcore.Head")
    assert hook_problems(changed) == [
        "docs/plugins.md: register_heads: missing its signature `factory(params, in_dim) -> mmcore.Head`"
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


def test_docs_exportable_text_encoder_passes_the_contract_and_exports():
    """The host featurizer example of 'Making a text encoder exportable' is a working, exportable encoder."""
    from mmcore.export.onnx import plan_text
    from mmcore.plugins.hookspecs import hookimpl
    from mmcore.testing import check_text_encoder

    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("### Making a text encoder exportable"):]
    source = example("register_text_encoders") + "\n" + re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = load_module("docs_exportable_text", source)  # its own register_text_encoders declares the featurizer
    registry = make_registry(load_entrypoints=False, extra_plugins=[("docs-exportable-text", module)])
    encoder = check_text_encoder("char_ngrams", {"dim": 64}, registry=registry)
    (part,) = plan_text(encoder).parts
    assert part.names == ("char_counts",) and part.featurizer is encoder.featurizer

    class Undeclared:  # the same encoder registered without data_classes: a bundle could not name its featurizer
        @hookimpl
        def register_text_encoders(register):
            register("char_ngrams", module.ExportableCharNgrams, module.CharNgramParams)

    registry = make_registry(load_entrypoints=False, extra_plugins=[("docs-undeclared", Undeclared)])
    with pytest.raises(AssertionError) as failure:
        check_text_encoder("char_ngrams", {"dim": 64}, registry=registry)
    assert str(failure.value) == (
        "text encoder 'char_ngrams': CharFeaturizer is not a declared data class, so a bundle cannot name it; its plugin "
        "declares it: register('char_ngrams', factory, params_cls, data_classes=(CharFeaturizer,))")


def test_a_text_encoder_whose_split_differs_from_encode_fails_the_contract(monkeypatch):
    """check_text_encoder catches an encode() that is not encode_features(featurizer(texts)): its bundle would differ."""
    from mmcore.testing import check_text_encoder

    ngrams = pytest.importorskip("mmcore_text_ngrams")
    real = ngrams.NgramTextEncoder.encode
    monkeypatch.setattr(ngrams.NgramTextEncoder, "encode", lambda self, texts: 2 * real(self, texts))
    with pytest.raises(AssertionError, match=r"^ngrams: encode must equal encode_features\(host_features\(\)\(texts\)\) \(max diff"):
        check_text_encoder("ngrams", {"n_features": 64})


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
name = "{vision}"
params = {vision_params}
[text]
name = "{text}"
params = {text_params}
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

#: (args of new-plugin, folder it writes under plugins/): one per template
GENERATED = [
    (["kit_conv", "--kind", "vision"], "vision-kit-conv"),
    (["kit_words", "--kind", "text"], "text-kit-words"),
    (["mobilenet_v3_small", "--from", "torchvision"], "vision-mobilenet"),
    (["kit_timm", "--from", "timm"], "vision-kit-timm"),
    (["kit_hf", "--from", "hf-text"], "text-kit-hf"),
    (["kit_st", "--from", "sentence-transformers", "--package", "acme-text-st"], "acme-text-st"),
]
#: (vision, vision params, text, text params) trained once each: every template, and the docs' walkthrough
TRAINED = [
    ("kit_conv", "{ width = 8, depth = 2, image_size = 32 }", "kit_words", "{ dim = 16, buckets = 512 }"),
    ("mobilenet_v3_small", "{ tiny = true }", "kit_hf", "{ tiny = true }"),
    ("kit_timm", "{ tiny = true }", "kit_st", "{ tiny = true }"),
    ("docs_mobilenet", "{ tiny = true }", "char_ngrams", "{ dim = 64, min_n = 2, max_n = 3 }"),
]

TRAIN_ALL = """
import json, sys
from mmcore.commands.run import run_training
from mmcore.plugins import get_registry
from mmcore.recipe import load_recipe

registry = get_registry()
for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):
    run_training(load_recipe(recipe), recipe_path=recipe, out=out, registry=registry, progress=False,
                 echo=lambda line: print(line, flush=True))
print(json.dumps(sorted({(r.package, r.name) for r in registry.all() if r.package != "mmcore"})))
"""


def docs_walkthrough_packages(root):
    """The docs' two example plugins as package folders: their python blocks and pyproject blocks.

    The vision example is renamed docs_mobilenet, so that it installs beside the template's
    mobilenet_v3_small (the same name twice is an error, rightly)."""
    text = DOCS.read_text(encoding="utf-8")
    walkthrough = sections(text)["Walkthrough: two plugins end to end"]
    vision_toml, text_toml = re.findall(r"```toml\n(.*?)```", walkthrough, re.S)[:2]
    packages = {
        "vision-mobilenet": (vision_toml.replace("mmcore-vision-mobilenet", "docs-vision-mobilenet")
                             .replace("mmcore_vision_mobilenet", "docs_vision_mobilenet"),
                             example("register_vision_encoders").replace('NAME = "mobilenet_v3_small"', 'NAME = "docs_mobilenet"')),
        "text-char-ngrams": (text_toml, example("register_text_encoders")),
    }
    folders = []
    for folder, (pyproject, module) in packages.items():
        project = tomllib.loads(pyproject)
        (module_name,) = project["project"]["entry-points"]["mmcore"].values()
        (root / folder / "src" / module_name).mkdir(parents=True)
        (root / folder / "pyproject.toml").write_text("[build-system]\nrequires = [\"setuptools>=68\"]\n"
                                                      "build-backend = \"setuptools.build_meta\"\n\n" + pyproject)
        (root / folder / "src" / module_name / "__init__.py").write_text(module)
        folders.append(root / folder)
    return folders


@pytest.mark.slow
def test_every_template_and_the_docs_walkthrough_install_pass_their_tests_and_train(tmp_path, demo_data):
    """Generate one package per new-plugin template (one through the standalone command), build
    the docs' two example plugins, pip install all of them in one step into a private folder (not
    the shared venv, so parallel tests never see them), run the generated packages' own tests, then
    train four recipes that name them all, in one process loading them through their entry points."""
    code = "from mmcore.cli.new_plugin import new_plugin_command; new_plugin_command()"
    first_args, _ = GENERATED[0]
    subprocess.run([sys.executable, "-c", code, *first_args], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    for args, folder in GENERATED[1:]:
        result = new_plugin(*args, "--dir", tmp_path / "plugins" / folder)
        assert result.exit_code == 0, result.output
    generated = [tmp_path / "plugins" / folder for _, folder in GENERATED]
    docs_packages = docs_walkthrough_packages(tmp_path / "docs")
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "-q", "--target", str(site), *map(str, generated + docs_packages)]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    dists = ["mmcore-vision-kit-conv", "mmcore-text-kit-words", "mmcore-vision-mobilenet", "mmcore-vision-kit-timm",
             "mmcore-text-kit-hf", "acme-text-st", "docs-vision-mobilenet", "mmcore-text-char-ngrams"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "MMCORE_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        # only these (and the built-ins): fast, and proves they load through their entry points
        "MMCORE_LOAD_PLUGINS": ",".join(dists),
    }
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(p / "tests") for p in generated]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"\b30 passed\b", tests.stdout), tests.stdout

    args = []
    for i, (vision, vision_params, text, text_params) in enumerate(TRAINED):
        recipe = tmp_path / f"kit{i}.toml"
        recipe.write_text(RECIPE.format(data=demo_data, vision=vision, vision_params=vision_params,
                                        text=text, text_params=text_params))
        args += [str(recipe), str(tmp_path / f"run{i}")]
    run = subprocess.run([sys.executable, "-c", TRAIN_ALL, *args], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    registered = json.loads(run.stdout.splitlines()[-1])
    assert registered == sorted([
        ["acme-text-st", "kit_st"], ["docs-vision-mobilenet", "docs_mobilenet"], ["mmcore-text-char-ngrams", "char_ngrams"],
        ["mmcore-text-kit-hf", "kit_hf"], ["mmcore-text-kit-words", "kit_words"], ["mmcore-vision-kit-conv", "kit_conv"],
        ["mmcore-vision-kit-timm", "kit_timm"], ["mmcore-vision-mobilenet", "mobilenet_v3_small"],
    ])
    assert "features are" not in run.stdout  # no template gives a dead encoder
    for i, (vision, _, text, _) in enumerate(TRAINED):
        out = tmp_path / f"run{i}"
        assert json.loads((out / "status.json").read_text())["state"] == "completed"
        results = json.loads((out / "results.json").read_text())
        assert results["epochs_trained"] == 1 and 0.0 <= results["test"]["at_threshold"]["auroc"] <= 1.0
        assert len(json.loads((out / "test_predictions.json").read_text())) == 32
        encoders = torch.load(out / "checkpoint_best.ckpt", weights_only=True)["encoders"]
        assert encoders["vision"].startswith(f"{vision}|random|") and encoders["text"].split("|")[0] == text
    assert torch.load(tmp_path / "run3" / "checkpoint_best.ckpt", weights_only=True)["encoders"]["text"].startswith(
        "char_ngrams|none|-|"
    )
    # the docs' cross-field check and NoWeightsParams, found by `mmcore show` before anything runs
    recipe = tmp_path / "kit3.toml"
    for key, message in [
        ("text.params.max_n=1", "text.params.max_n: must be >= min_n (2) (got 1)"),
        ("text.params.weights=x", "text.params.weights: this encoder loads no weights, so it takes no weights (got 'x'); remove the key"),
    ]:
        show = subprocess.run([sys.executable, "-m", "mmcore", "show", str(recipe), "--set", key],
                              env=env, capture_output=True, text=True, timeout=300)
        assert (show.returncode, show.stdout) == (2, "")
        assert show.stderr.splitlines() == [f"{recipe} (--set {key.split('=')[0]}): {message}"]


def test_package_sets_every_name(tmp_path):
    result = new_plugin("mobilenet_v3_small", "--from", "torchvision", "--package", "acme-vision-mobile",
                        "--dir", tmp_path / "pkg")
    assert result.exit_code == 0, result.output
    root = tmp_path / "pkg"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [".gitignore", "README.md", "pyproject.toml", "src/acme_vision_mobile/__init__.py",
                     "tests/test_acme_vision_mobile.py"]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "acme-vision-mobile"
    assert project["project"]["entry-points"] == {"mmcore": {"acme-vision-mobile": "acme_vision_mobile"}}
    assert project["project"]["dependencies"] == ["mmcore>=0.1.0", "torchvision>=0.19"]
    test = (root / "tests" / "test_acme_vision_mobile.py").read_text()
    assert '.package == "acme-vision-mobile"' in test and "mmmcore-vision" not in test
    module = (root / "src" / "acme_vision_mobile" / "__init__.py").read_text()
    assert module.startswith('"""acme-vision-mobile: the ``mobilenet_v3_small`` vision encoder')
    assert 'WEIGHTS_ID = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"' in module
    assert result.output.splitlines()[0] == (
        f"wrote {root}/ (acme-vision-mobile, module acme_vision_mobile, vision encoder 'mobilenet_v3_small')"
    )


def test_the_default_package_is_named_after_the_family(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert new_plugin("mobilenet_v3_small", "--from", "torchvision").exit_code == 0
    assert new_plugin("vit_base", "--from", "timm").exit_code == 0
    project = tomllib.loads((tmp_path / "plugins" / "vision-mobilenet" / "pyproject.toml").read_text())
    assert project["project"]["name"] == "mmcore-vision-mobilenet"
    module = (tmp_path / "plugins" / "vision-vit" / "src" / "mmcore_vision_vit" / "__init__.py").read_text()
    assert 'MODEL_NAME = "resnet18.a1_in1k"  # a timm model name' in module  # vit_base is not one of timm's names


@pytest.mark.parametrize(
    "args,message",
    [
        (["x", "--from", "torchvision", "--kind", "text"], "new-plugin: --from torchvision makes a vision encoder, not --kind text"),
        (["x"], "new-plugin: --from plain needs --kind (vision or text)"),
        (["x", "--kind", "text", "--package", "Acme_Text"],
         "new-plugin: --package 'Acme_Text' must be lowercase letters and digits, words joined by single hyphens "
         "(like mmcore-vision-acme): it is the distribution, the entry point and, with _ for -, the import name"),
    ],
)
def test_new_plugin_refuses_bad_template_options_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(new_plugin_command, [*args, "--dir", str(tmp_path / "x")])
    assert (result.exit_code, result.output) == (2, message + "\n")
    assert not (tmp_path / "x").exists()


# --- a dead encoder fails the contract and is warned about at run start ----------------------


@attrs.frozen(kw_only=True)
class WidthParams(EncoderParams):
    width: int = 8  # what the tiny recipe passes; the dead encoder ignores it


class ConstantEncoder(FeatureMapEncoder):
    """Sees only a tensor of ones: the same features for every image (a dead encoder)."""

    def __init__(self, **kwargs):
        super().__init__(out_dim=8, name="constant_cnn", weights="random", preprocessing=square_preprocessing(32), **kwargs)
        self.block = torch.nn.Conv2d(3, 8, 3, padding=1)

    def feature_map(self, pixel_values):
        return self.block(torch.ones_like(pixel_values)) + 1.0

    def blocks(self):
        return [self.block]


class ConstantText(TextEncoder):
    name, out_dim, weights = "constant_text", 4, NO_WEIGHTS

    def encode(self, texts):
        return torch.ones(len(texts), self.out_dim, device=self.device)


def dead_plugin():
    module = types.ModuleType("dead")

    @hookimpl
    def register_vision_encoders(register):
        register("constant_cnn", lambda params: ConstantEncoder(), WidthParams)

        def mobilenet(params):  # random weights, default BatchNorm statistics: dies by the last block
            from torchvision.models import mobilenet_v3_small

            return MobileNet(mobilenet_v3_small(), name="mobilenet_v3_small", weights="random",
                             preprocessing=torchvision_preprocessing("MobileNet_V3_Small_Weights.IMAGENET1K_V1", size=64))

        register("mobilenet_v3_small", mobilenet, EncoderParams)

    @hookimpl
    def register_text_encoders(register):
        register("constant_text", lambda params: ConstantText(), NoWeightsParams)

    module.register_vision_encoders = register_vision_encoders
    module.register_text_encoders = register_text_encoders
    return module


class MobileNet(FeatureMapEncoder):
    def __init__(self, model, **kwargs):
        super().__init__(out_dim=model.features[-1].out_channels, **kwargs)
        self.features = model.features

    def feature_map(self, pixel_values):
        return self.features(pixel_values)

    def blocks(self):
        return list(self.features)[1:]


@pytest.fixture(scope="module")
def dead_registry():
    return make_registry(load_entrypoints=False, extra_plugins=[("dead", dead_plugin())])


def test_an_encoder_of_constants_fails_the_contract_with_what_was_seen(dead_registry):
    with pytest.raises(AssertionError) as info:
        testing.check_vision_encoder("constant_cnn", {}, registry=dead_registry)
    assert str(info.value) == (
        "constant_cnn: vision features are near-constant across 2 distinct images (relative spread 0.0e+00); "
        + testing.DEAD_HINT
    )
    with pytest.raises(AssertionError) as info:
        testing.check_text_encoder("constant_text", {}, registry=dead_registry)
    assert str(info.value) == (
        "constant_text: text features are near-constant across 3 distinct texts (relative spread 0.0e+00); "
        + testing.DEAD_HINT
    )


def test_mobilenet_v3_at_random_weights_fails_the_contract_and_calibrated_norms_revive_it(dead_registry):
    torch.manual_seed(0)
    with pytest.raises(AssertionError) as info:
        testing.check_vision_encoder("mobilenet_v3_small", {}, registry=dead_registry)
    assert re.fullmatch(
        r"mobilenet_v3_small: vision features are near zero \(largest RMS \d\.\de-(08|09|10) over 2 images\); "
        + re.escape(testing.DEAD_HINT),
        str(info.value),
    ), str(info.value)
    encoder = testing.build("vision", "mobilenet_v3_small", {}, dead_registry)
    calibrate_batchnorm(encoder.features, 64)
    with torch.no_grad():
        pooled = testing.encode_samples(encoder).tokens.mean(dim=1)
    assert testing.feature_problem(pooled) is None and float(pooled.pow(2).mean().sqrt()) > 0.01


def test_nan_after_a_training_step_is_named():
    assert feature_problem(torch.tensor([[1.0, float("nan")], [0.5, 0.2]]), inputs="images") == (
        "not finite (NaN or inf for 1 of 2 images)"
    )


def test_a_run_warns_on_its_first_batch_of_dead_features(tiny_recipe, dead_registry, tmp_path):
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    path = tiny_recipe(vision={"name": "constant_cnn"}, text={"name": "constant_text"}, cache={"enabled": False})
    lines = []
    run_training(load_recipe(path, registry=dead_registry), recipe_path=path, out=tmp_path / "run",
                 registry=dead_registry, progress=False, echo=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [
        "warning: vision features are near-constant across 8 distinct images (relative spread 0.0e+00) on the first "
        "batch (vision encoder 'constant_cnn', weights random); the model cannot learn from them: check the "
        "encoder's weights before trusting its results",
        "warning: text features are near-constant across 8 distinct texts (relative spread 0.0e+00) on the first "
        "batch (text encoder 'constant_text', weights none); the model cannot learn from them: check the "
        "encoder's weights before trusting its results",
    ]


def test_a_healthy_run_gives_no_feature_warning(tiny_recipe, registry, tmp_path):
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    path = tiny_recipe()
    lines = []
    run_training(load_recipe(path, registry=registry), recipe_path=path, out=tmp_path / "run",
                 registry=registry, progress=False, echo=lines.append)
    assert not [line for line in lines if "features are" in line]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "completed"
