"""A self-contained export bundle: what it holds, how it is written, verified and opened.

```
BUNDLE_DIR/
  manifest.json         format, modality, graph inputs, versions, sha256 + size of every other file
  model.onnx            the whole fused model (or model.torchscript.pt with --format torchscript)
  model.onnx.data       the graph's weights in one file, when they are over ONNX's 2 GiB protobuf limit
  model.safetensors     the classifier's state dict (only with mmcore export --safetensors)
  recipe.toml           the run's fully resolved recipe
  decision.json         threshold, the rule that chose it, temperature
  inputs.json           how the host turns an image and a text into the graph's inputs: the vision
                        preprocessing (its class by registry name + its fields) and the text side
                        (see mmcore.export.inputs and mmcore.export.text)
  tokenizer/            the text encoder's tokenizer files (one encoder with a tokenizer)
  tokenizers/text0/     ... or one folder per tokenizer part of a concat text encoder
  parity.json           the parity gate's figures (bundle vs the PyTorch run)
  README.md             the model card: what the model is, its data, test metrics, decision, how to call it
  reference_profile.safetensors
                        the run's reference profile (mmcore.quality.profile: what mmcore drift compares
                        new rows with; its summary in the safetensors metadata, its sampled scores and
                        embeddings as tensors), copied from the run directory when it has one
```

A bundle is data: nothing in it names a module to import. An object it stores (the
preprocessing, a host featurizer) names its class by registry name (``mmcore/Preprocessing``,
``vision/siglip2_naflex_base/NaflexPreprocessing``): a class the core or a registered component
declared (:meth:`mmcore.plugins.registry.Registry.data_class`), structured field by field. Every
file is checked against its schema when the bundle is opened (:mod:`mmcore.export.schema`), and
every listed file must be a regular file inside the folder with its recorded size; digests are
checked once per bundle and machine (:mod:`mmcore.export.verified`) or on request.

``bundle_format`` 1 is a bundle whose text encoder (if any) is one tokenizer encoder; 2 adds host
featurizers and ``concat`` text encoders; 3 names classes by registry name and stores the weights
once; 4 keeps the preprocessing and the text side in one file, ``inputs.json`` (formats 1 to 3 had
them in ``preprocessing.json`` and ``text.json``, which this mmcore still reads); 5 keeps a fast
tokenizer as its ``tokenizer.json`` alone, with how it pads and truncates recorded in ``inputs.json``
(``fast_tokenizer``: read with the ``tokenizers`` library, without transformers; formats 1 to 4
kept transformers' ``tokenizer_config.json`` beside it and are read with transformers). Formats 1 and 2
named classes by module path: this mmcore still opens them by comparing that path with the declared
classes (never importing it); an older mmcore refuses a newer format in one line. Bundles of
format 4 exported before the reference profile became one file hold it as a folder,
``reference_profile/`` (``profile.json``, ``scores.npy``, ``embeddings_<m>.npy``, each listed in
the manifest); ``mmcore drift`` reads either (the format did not change: the manifest's listing
says which it is, and nothing else of the bundle reads the profile).

A bundle is written into a hidden temporary folder beside ``BUNDLE_DIR`` and renamed into
place only after the parity gate passed, so a folder named ``BUNDLE_DIR`` is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import attrs

from mmcore.devices import parse_device
from mmcore.errors import MmcoreError, RunError
from mmcore.export import schema as S
from mmcore.export import verified as V
from mmcore.rundir import RECIPE_FILE

MANIFEST = "manifest.json"
#: the newest bundle format this mmcore reads and the one it writes (see the module docstring)
BUNDLE_FORMAT = 5
WEIGHTS = "model.safetensors"
DECISION = "decision.json"
INPUTS = "inputs.json"
#: the newest format that kept the inputs description in two files, these
SPLIT_INPUTS_FORMAT = 3
PREPROCESSING = "preprocessing.json"
TEXT = "text.json"
TOKENIZER = "tokenizer"
TOKENIZERS = "tokenizers"
PARITY = "parity.json"
MODEL_CARD = "README.md"
#: the run's reference profile, one safetensors file (its reader, mmcore.quality.profile, is its schema);
#: bundles exported before it kept a ``reference_profile/`` folder, which mmcore drift still reads
REFERENCE_PROFILE = "reference_profile.safetensors"
RECIPE = RECIPE_FILE  # the resolved recipe, named as in a run directory
#: the graph file of each format: a manifest naming another file for its format is refused
GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
#: the one file beside model.onnx that holds its weights when they are over the protobuf limit
EXTERNAL_DATA = "model.onnx.data"


def is_bundle(path):
    """True when ``path`` is a folder holding a ``manifest.json`` (whether that manifest is valid
    is :func:`read_manifest`'s to say, in one line: a broken bundle is not a run directory)."""
    return (Path(path) / MANIFEST).is_file()


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
    for name in ("mmcore", "torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "transformers",
                 "tokenizers", "sentence-transformers", "scikit-learn", "safetensors", "pillow"):
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


# -- objects stored as data ---------------------------------------------------------------


def describe_object(obj, registry, *, kind, component):
    """An attrs object as data: its class by registry name (declared by ``component`` of ``kind``
    or by the core) and its init fields; RunError naming the class when nobody declared it."""
    from mmcore.plugins.kinds import KINDS
    from mmcore.recipe.convert import converter

    cls = type(obj)
    name = registry.data_class_name(cls, kind=kind, name=component)
    if name is None:
        raise RunError(
            f"{KINDS[kind].human} {component!r}: {cls.__qualname__} is not a declared data class, so a bundle cannot name it; "
            f"its plugin declares it: register({component!r}, factory, params_cls, data_classes=({cls.__name__},))")
    fields = {field.name: getattr(obj, field.name) for field in attrs.fields(cls) if field.init}
    return {"class": name, "fields": converter.unstructure(fields)}


def rebuild_object(data, registry, *, source, what):
    """The inverse of :func:`describe_object`: the declared class looked up by registry name (never
    imported), its fields structured and validated one by one; every problem one line naming ``source``.

    A bundle of format 1 or 2 names the class by ``module`` + ``class``; that pair is compared with
    the declared classes' own, and refused when none has it.
    """
    from mmcore.plugins.registry import UnknownDataClassError

    if not isinstance(data, dict):
        raise S.BundleError(f"{source}: {what} must be a JSON object (got {type(data).__name__})")
    unknown = sorted(set(data) - {"class", "fields", "describe", "module"})
    if unknown:
        raise S.BundleError(f"{source}: {unknown[0]}: unknown key")
    fields = data.get("fields", {})
    if not isinstance(fields, dict):
        raise S.BundleError(f"{source}: fields: must be a JSON object (got {type(fields).__name__})")
    if "module" in data:  # formats 1 and 2
        module, qualname = data.get("module"), data.get("class")
        cls = registry.data_class_by_path(module, qualname) if isinstance(module, str) and isinstance(qualname, str) else None
        if cls is None:
            raise S.BundleError(
                f"{source}: {what} {module}.{qualname} is not a data class any installed mmcore component declares; "
                "a bundle's classes are never imported (install the plugin that made this bundle, or export the run again)")
    else:
        try:
            cls = registry.data_class(data.get("class"))
        except UnknownDataClassError as exc:
            raise S.BundleError(f"{source}: class: {what} {exc}") from None
    if "module" in data:  # formats 1 and 2 stored every field, also those the class computes itself
        init = {field.name for field in attrs.fields(cls) if field.init}
        fields = {key: value for key, value in fields.items() if key in init}
    return S.structure_file(fields, cls, path=source, at="fields")


def describe_preprocessing(preprocessing, registry, *, component):
    """The vision encoder's preprocessing as data: its class by registry name, fields and its describe()."""
    return {**describe_object(preprocessing, registry, kind="vision", component=component),
            "describe": preprocessing.describe()}


def rebuild_preprocessing(data, registry, *, source):
    """The inverse of :func:`describe_preprocessing`."""
    return rebuild_object(data, registry, source=source, what="preprocessing class")


# -- the manifest -------------------------------------------------------------------------


def copy_reference_profile(run_dir, folder):
    """Copy the run's reference profile into the bundle ``folder`` as ``reference_profile.safetensors``,
    checked by its reader first (a damaged profile is refused at export, one line). A run that kept
    it in the older ``reference_profile/`` folder gets it rewritten as the one file; a run without
    one is exported without it. -> the file written, or None."""
    import shutil

    from mmcore.quality.profile import PROFILE_DIR, profile_path, read_profile, write_profile

    source = profile_path(run_dir)
    if not source.exists():
        return None
    profile = read_profile(source)
    target = Path(folder) / REFERENCE_PROFILE
    if source.name == PROFILE_DIR:
        return write_profile(target, profile)
    shutil.copyfile(source, target)  # the file just checked, byte for byte
    return target


def file_entries(folder, known=None):
    """``{relative path: {sha256, bytes}}`` of every file under ``folder`` but the manifest.

    Entries in ``known`` are taken as they are (the exporter hashes each file once: the files it
    wrote before the gate are not hashed again when parity.json and the model card join them).
    """
    folder = Path(folder)
    known = known or {}
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        entries[rel] = known.get(rel) or {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def write_manifest(folder, info, entries):
    """``manifest.json``: ``info`` + versions + ``entries`` (from :func:`file_entries`)."""
    manifest = {"kind": "mmcore-bundle", "bundle_format": BUNDLE_FORMAT, **info, "versions": versions(),
                "files": entries}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return manifest


def read_manifest(folder, *, verify=None):
    """The bundle's manifest (:class:`~mmcore.export.schema.Manifest`), checked against its schema.

    Every listed file must be a regular file inside ``folder`` with its recorded size, and the
    graph (and its external data file) must be listed. ``verify``: True checks every sha256 and
    that an ONNX graph's external data is only the listed file; None (the default) checks them
    unless this machine verified this very bundle before (:mod:`mmcore.export.verified`); False
    checks sizes only (the exporter's own folder).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    raw_bytes = S.read_bounded(path, limit=S.MAX_JSON_BYTES, what="the bundle manifest")
    data = S.parse_json(raw_bytes, path=path, what="the bundle manifest")
    if data.get("kind") != "mmcore-bundle":
        raise S.BundleError(f"{path}: not an mmcore bundle manifest (kind: {data.get('kind')!r})")
    version = data.get("bundle_format")
    if isinstance(version, int) and not isinstance(version, bool) and version > BUNDLE_FORMAT:
        raise S.BundleError(f"{path}: bundle format {version} is newer than this mmcore reads "
                            f"({BUNDLE_FORMAT}); upgrade mmcore")
    manifest = S.structure_file(data, S.Manifest, path=path)
    _check_graph_entries(manifest, path)
    _check_files(folder, manifest)
    fingerprint = V.fingerprint(folder, raw_bytes, manifest.files)
    if verify is False or (verify is None and V.is_verified(fingerprint)):
        return manifest
    for rel, entry in manifest.files.items():
        if sha256_file(folder / rel) != entry.sha256:
            raise S.BundleError(f"{folder}: {rel}: sha256 differs from {MANIFEST} (the file was changed after export)")
    if manifest.graph.format == "onnx":  # checked with the digests: see check_external_data
        from mmcore.export.runner import check_external_data

        check_external_data(folder / manifest.graph.file, manifest.graph.external_data)
    V.remember(fingerprint)
    return manifest


def bundle_device(folder, device, precision):
    """The device a bundle of ``precision`` runs on for ``--device device``: an int8 bundle on the CPU
    (``auto`` and ``cpu``), CUDA asked for is one line (exit 1)."""
    if precision != "int8":
        return device
    if str(parse_device(device)).startswith("cuda"):
        raise MmcoreError(f"{folder}: an int8 bundle runs on CPU only; use --device cpu")
    return "cpu"


def remember_verified(folder, entries):
    """Record the bundle just written to ``folder`` (whose files' digests are ``entries``) as verified here."""
    try:
        V.remember(V.fingerprint(folder, (Path(folder) / MANIFEST).read_bytes(), entries))
    except OSError:
        pass  # the first start hashes the bundle instead


def _check_graph_entries(manifest, path):
    """The graph is the file of its format, listed; ONNX external data is the one listed file beside it."""
    graph = manifest.graph
    if graph.file != GRAPH_FILES[graph.format]:
        raise S.BundleError(f"{path}: graph.file: the {graph.format} graph is {GRAPH_FILES[graph.format]!r} "
                            f"(got {graph.file!r})")
    if graph.file not in manifest.files:
        raise S.BundleError(f"{path}: graph.file: {graph.file} is not listed in files")
    if graph.external_data is not None:
        if graph.format != "onnx" or graph.external_data != EXTERNAL_DATA:
            raise S.BundleError(f"{path}: graph.external_data: only an onnx graph has one, {EXTERNAL_DATA!r} "
                                f"(got {graph.external_data!r})")
        if graph.external_data not in manifest.files:
            raise S.BundleError(f"{path}: graph.external_data: {graph.external_data} is not listed in files")


def _check_files(folder, manifest):
    """Every listed file: a regular file inside the folder (no link out of it), of its recorded size."""
    root = folder.resolve()
    for rel, entry in manifest.files.items():
        file = folder / rel
        try:
            inside = file.resolve().is_relative_to(root)
            info = os.stat(file)
        except FileNotFoundError:
            raise S.BundleError(f"{folder}: {rel}: listed in {MANIFEST} but missing") from None
        except OSError as exc:
            raise S.BundleError(f"{folder}: {rel}: cannot be read ({exc.strerror or exc})") from None
        if not inside:
            raise S.BundleError(f"{folder}: {rel}: leads outside the bundle folder (a link); a bundle holds its own files")
        if not os.path.isfile(file):
            raise S.BundleError(f"{folder}: {rel}: not a regular file")
        if info.st_size != entry.bytes:
            raise S.BundleError(f"{folder}: {rel}: {info.st_size} bytes, {MANIFEST} says {entry.bytes} "
                                "(the file was changed after export)")
