"""``mmcore new-plugin``: write a complete, working plugin package to start from.

```
mmcore new-plugin mynet --kind vision                         # a small CNN of its own -> plugins/vision-mynet/
mmcore new-plugin mobilenet_v3_small --from torchvision       # wraps torchvision's model -> plugins/vision-mobilenet/
mmcore new-plugin resnet18 --from timm --package mmcore-vision-acme
mmcore new-plugin minilm --from sentence-transformers --dir ../text-minilm
```

``--from`` picks what the package wraps: ``plain`` (a model of its own: a small CNN, or a
hashing bag of n-grams), ``torchvision``, ``timm`` (vision), ``hf-text`` (transformers
``AutoModel`` + pooling) or ``sentence-transformers`` (text). Each wraps the library model the
common way: weights from the hub id or a local file, a ``tiny`` test build, preprocessing from
the library's own transforms. ``--package`` names the distribution (and so the entry point,
the import name, the folder and the test file); by default it is ``mmcore-<kind>-<family>``,
the family being the name without its size or version (``mobilenet_v3_small`` ->
``mmcore-vision-mobilenet``). The files come from ``mmcore/templates/plugin/``; ``{{key}}``
marks what is filled in.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import attrs

from mmcore import __version__
from mmcore.errors import MmcoreError
from mmcore.io import check_output_path

KINDS = ("vision", "text")
#: stricter than component names in general: the name also becomes a distribution name
#: (``fullmatch``: ``$`` would let a trailing newline through into file names)
PLUGIN_NAME_RE = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")
#: a distribution name that is also a valid import name once "-" becomes "_"
PACKAGE_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
#: the longest NAME or --package: they become folder and file names (``tests/test_<...>.py``)
MAX_NAME_LENGTH = 64
#: name parts that say a size or version, not a family (``vit_base``, ``mobilenet_v3_small``)
SIZE_PART = re.compile(r"v?\d+[a-z]?|tiny|small|base|large|huge|giant|mini|micro|nano|xl|xxl|[a-z]\d+")


@attrs.frozen
class Template:
    """What ``--from`` wraps: its kind, its folder under ``templates/plugin/`` and its dependencies."""

    kind: str
    folder: str
    dependencies: tuple[str, ...] = ()


#: (``--from``, kind) -> template
TEMPLATES = {
    ("plain", "vision"): Template("vision", "vision"),
    ("plain", "text"): Template("text", "text"),
    ("torchvision", "vision"): Template("vision", "torchvision", ("torchvision>=0.19",)),
    ("timm", "vision"): Template("vision", "timm", ("timm>=1.0",)),
    ("hf-text", "text"): Template("text", "hf-text", ("transformers>=4.40",)),
    ("sentence-transformers", "text"): Template("text", "sentence-transformers", ("sentence-transformers>=3.0",)),
}
SOURCES = tuple(dict.fromkeys(source for source, _ in TEMPLATES))
#: what the library templates wrap when NAME is not one of the library's own models
DEFAULT_MODELS = {
    "torchvision": "mobilenet_v3_small",
    "timm": "resnet18.a1_in1k",
    "hf-text": "sentence-transformers/all-MiniLM-L6-v2",
    "sentence-transformers": "sentence-transformers/all-MiniLM-L6-v2",
}


class ScaffoldError(MmcoreError):
    """A bad plugin name or an existing target folder."""

    exit_code = 2


def family(name):
    """``mobilenet_v3_small`` -> ``mobilenet``, ``resnet50`` -> ``resnet``, ``char_ngrams`` unchanged."""
    parts = name.split("_")
    while len(parts) > 1 and SIZE_PART.fullmatch(parts[-1]):
        parts.pop()
    stem = "_".join(parts)
    if len(parts) == 1 and len(name.split("_")) == 1:
        stem = re.sub(r"\d+[a-z]?$", "", stem) or stem  # resnet50 -> resnet
    return stem


@attrs.frozen
class PluginNames:
    """Every name a generated plugin uses, derived from the component name, kind and package."""

    name: str
    kind: str
    template: str = "plain"
    package: str | None = None

    @property
    def dist(self):
        """Distribution and entry-point name: ``--package``, else ``mmcore-vision-<family>``."""
        return self.package or f"mmcore-{self.kind}-{family(self.name).replace('_', '-')}"

    @property
    def module(self):
        """Import name: the distribution with ``_`` for ``-`` (``mmcore_vision_mobilenet``)."""
        return self.dist.replace("-", "_")

    @property
    def folder(self):
        """Default folder under ``plugins/``: the distribution without ``mmcore-`` (``vision-mobilenet``)."""
        return self.dist.removeprefix("mmcore-")

    @property
    def test_file(self):
        """``tests/test_vision_mobilenet.py``."""
        return f"tests/test_{self.module.removeprefix('mmcore_')}.py"

    @property
    def class_prefix(self):
        """CamelCase prefix for the module's classes: ``MyNet`` (``Vision3d`` for ``3d``)."""
        camel = "".join(part.capitalize() for part in self.name.split("_"))
        return camel if camel[0].isalpha() else self.kind.capitalize() + camel

    @property
    def spec(self):
        """The template these names are filled into."""
        return TEMPLATES[(self.template, self.kind)]


def template_kind(template, kind):
    """The kind ``--from template`` makes; ``--kind`` is needed only for ``plain``."""
    kinds = [k for source, k in TEMPLATES if source == template]
    if not kinds:
        raise ScaffoldError(f"new-plugin: --from must be one of {', '.join(SOURCES)} (got {template!r})")
    if kind is None:
        if len(kinds) > 1:
            raise ScaffoldError(f"new-plugin: --from {template} needs --kind ({' or '.join(kinds)})")
        return kinds[0]
    if kind not in kinds:
        raise ScaffoldError(f"new-plugin: --from {template} makes a {kinds[0]} encoder, not --kind {kind}")
    return kind


def plugin_names(name, kind=None, *, template="plain", package=None):
    """Validated :class:`PluginNames`; a bad name raises :class:`ScaffoldError` (one line)."""
    if kind is not None and kind not in KINDS:
        raise ScaffoldError(f"new-plugin: --kind must be one of {', '.join(KINDS)} (got {kind!r})")
    kind = template_kind(template, kind)
    for option, value in (("name", name), ("--package", package)):
        if value is not None and len(value) > MAX_NAME_LENGTH:
            raise ScaffoldError(f"new-plugin: {option} {value[:20]!r}... is {len(value)} characters long; "
                                f"at most {MAX_NAME_LENGTH} (it becomes file and folder names)")
    if not PLUGIN_NAME_RE.fullmatch(name):
        raise ScaffoldError(
            f"new-plugin: name {name!r} must be lowercase letters and digits, words joined by "
            f"single underscores (like my_encoder): it becomes the component name in recipes"
        )
    if package is not None and not PACKAGE_RE.fullmatch(package):
        raise ScaffoldError(
            f"new-plugin: --package {package!r} must be lowercase letters and digits, words joined by "
            f"single hyphens (like mmcore-vision-acme): it is the distribution, the entry point and, "
            f"with _ for -, the import name"
        )
    return PluginNames(name, kind, template, package)


def wrapped_model(names):
    """What a library template wraps: NAME itself when the library has such a model, else its default."""
    if names.template == "torchvision":
        import torchvision.models

        try:
            weights = torchvision.models.get_model_weights(names.name)
            model = getattr(torchvision.models, names.name)(weights=None)
            if hasattr(model, "features") and weights is not None:
                return names.name
        except (ValueError, TypeError, AttributeError):
            pass
    if names.template == "timm":
        import timm

        from mmcore.kit.vision import TIMM_TINY, timm_family

        if timm.is_model(names.name) and timm_family(names.name) in TIMM_TINY:
            return names.name
    return DEFAULT_MODELS.get(names.template, "")


def _weights_id(names, model):
    if names.template != "torchvision":
        return ""
    import torchvision.models

    default = torchvision.models.get_model_weights(model).DEFAULT
    return f"{type(default).__name__}.{default.name}"


def _template(path):
    """The text of ``mmcore/templates/plugin/<path>`` (package data: works from a wheel too)."""
    resource = resources.files("mmcore") / "templates" / "plugin"
    for part in path.split("/"):
        resource = resource / part
    return resource.read_text(encoding="utf-8")


def render(text, names, **extra):
    """Fill ``{{key}}`` placeholders; an unknown key is a bug in the template."""
    values = {
        "name": names.name,
        "kind": names.kind,
        "dist": names.dist,
        "module": names.module,
        "Class": names.class_prefix,
        "template": names.template,
        "mmcore_version": __version__,
        "dependencies": "".join(f'    "{dep}",\n' for dep in names.spec.dependencies),
        **extra,
    }

    def fill(match):
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", fill, text)


def plugin_files(names):
    """``{relative path: text}`` of the package to write."""
    folder = names.spec.folder
    templates = {
        "pyproject.toml": "pyproject.toml.tmpl",
        ".gitignore": "gitignore.tmpl",
        "README.md": f"{folder}/README.md.tmpl",
        f"src/{names.module}/__init__.py": f"{folder}/module.py.tmpl",
        names.test_file: f"{folder}/test.py.tmpl",
    }
    model = wrapped_model(names)
    extra = {"model": model, "weights_id": _weights_id(names, model)}
    return {target: render(_template(source), names, **extra) for target, source in templates.items()}


def write_plugin(name, kind=None, directory=None, *, template="plain", package=None):
    """Write the plugin package into ``directory`` (default ``plugins/<dist without mmcore->`` in the
    current directory) and return its path. Refuses a folder that exists and is not empty."""
    names = plugin_names(name, kind, template=template, package=package)
    target = Path(directory) if directory is not None else Path("plugins") / names.folder
    check_output_path(target, "plugin folder", option="--dir", folder=True)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"new-plugin: {target} already exists; remove it or choose another --dir")
    files = plugin_files(names)
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


def already_registered(names):
    """The package that already registers this name, if any (installing both would fail)."""
    try:
        from mmcore.plugins.manager import get_registry

        for registration in get_registry().all():
            if registration.kind == names.kind and registration.name == names.name:
                return registration.package
    except Exception:  # a broken installed plugin must not stop scaffolding
        return None
    return None
