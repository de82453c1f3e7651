"""A self-contained export bundle: what it holds, how it is written, verified and opened.

```
BUNDLE_DIR/
  manifest.json         format, modality, graph inputs, versions, sha256 + size of every other file
  model.safetensors     the classifier's weights (no pickle)
  model.onnx            the whole fused model (or model.torchscript.pt with --format torchscript)
  recipe.toml           the run's fully resolved recipe
  decision.json         threshold, the rule that chose it, temperature
  preprocessing.json    the vision encoder's preprocessing (class + every field)
  text.json             how the host turns strings into the graph's text inputs (see mmcore.export.text)
  tokenizer/            the text encoder's tokenizer files (one encoder with a tokenizer)
  tokenizers/text0/     ... or one folder per tokenizer part of a concat text encoder
  parity.json           the parity gate's figures (bundle vs the PyTorch run)
```

``bundle_format`` 1 is a bundle whose text encoder (if any) is one tokenizer encoder; 2 adds
host featurizers and ``concat`` text encoders. An export writes the oldest format that holds
what it exports, so an older mmcore still opens the bundles it can score and refuses the others
in one line.

A bundle is written into a hidden temporary folder beside ``BUNDLE_DIR`` and renamed into
place only after the parity gate passed, so a folder named ``BUNDLE_DIR`` is always complete.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
from pathlib import Path

import attrs

from mmcore.errors import RunError
from mmcore.rundir import RECIPE_FILE

MANIFEST = "manifest.json"
#: the newest bundle format this mmcore reads (see the module docstring)
BUNDLE_FORMAT = 2
#: the format of bundles whose text side is one tokenizer (or no text)
TOKENIZER_ONLY_FORMAT = 1
WEIGHTS = "model.safetensors"
DECISION = "decision.json"
PREPROCESSING = "preprocessing.json"
TEXT = "text.json"
TOKENIZER = "tokenizer"
TOKENIZERS = "tokenizers"
PARITY = "parity.json"
RECIPE = RECIPE_FILE  # the resolved recipe, named as in a run directory


def is_bundle(path):
    """True when ``path`` is a folder holding an mmcore bundle manifest."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind") == "mmcore-bundle"
    except (OSError, ValueError):
        return False


def sha256_file(path, block=1 << 20):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def versions():
    """Versions of everything that changes what a bundle computes."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("mmcore", "torch", "torchvision", "onnx", "onnxruntime", "transformers", "tokenizers",
                 "sentence-transformers", "scikit-learn", "safetensors", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def write_weights(model, path):
    """The classifier's state dict as safetensors (shared tensors copied apart: safetensors refuses aliases)."""
    from safetensors.torch import save_file

    state = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def describe_object(obj):
    """An attrs object as data: its class (module + name) and every field (no pickle)."""
    cls = type(obj)
    return {"module": cls.__module__, "class": cls.__qualname__, "fields": attrs.asdict(obj, recurse=False)}


def rebuild_object(data, *, source, what):
    """The inverse of :func:`describe_object` (lists back to tuples for the attrs fields);
    ``what`` names the object in the one-line error (``preprocessing class``)."""
    try:
        cls = getattr(importlib.import_module(data["module"]), data["class"])
    except (ImportError, AttributeError, KeyError, TypeError) as exc:
        module, name = (data.get("module"), data.get("class")) if isinstance(data, dict) else (None, None)
        raise RunError(f"{source}: {what} {module}.{name} is not importable ({exc}); "
                       "install the plugin that made this bundle") from None
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in data.get("fields", {}).items()}
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise RunError(f"{source}: {what} {data['module']}.{data['class']} cannot be rebuilt from its fields "
                       f"({exc}); install the plugin version that made this bundle") from None


def describe_preprocessing(preprocessing):
    """The preprocessing object as data: its class (module + name), every attrs field and its describe()."""
    return {**describe_object(preprocessing), "describe": preprocessing.describe()}


def rebuild_preprocessing(data, *, source):
    """The inverse of :func:`describe_preprocessing`."""
    return rebuild_object(data, source=source, what="preprocessing class")


def write_manifest(folder, info):
    """``manifest.json``: ``info`` + versions + the sha256 and size of every other file in ``folder``."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"kind": "mmcore-bundle", "bundle_format": BUNDLE_FORMAT, **info, "versions": versions(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def read_manifest(folder, *, verify=True):
    """The bundle's manifest; with ``verify``, every listed file must be there with its sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot read the bundle manifest ({exc})") from None
    if manifest.get("kind") != "mmcore-bundle":
        raise RunError(f"{path}: not an mmcore bundle manifest")
    if manifest.get("bundle_format", 0) > BUNDLE_FORMAT:
        raise RunError(f"{path}: bundle format {manifest['bundle_format']} is newer than this mmcore reads "
                       f"({BUNDLE_FORMAT}); upgrade mmcore")
    if verify:
        for rel, entry in manifest.get("files", {}).items():
            file = folder / rel
            if not file.is_file():
                raise RunError(f"{folder}: {rel}: listed in {MANIFEST} but missing")
            if sha256_file(file) != entry["sha256"]:
                raise RunError(f"{folder}: {rel}: sha256 differs from {MANIFEST} (the file was changed after export)")
    return manifest
