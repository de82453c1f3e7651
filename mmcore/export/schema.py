"""What each file of a bundle may hold, checked when the bundle is opened.

A bundle is data from wherever it was copied from: every JSON file is read as a bounded regular
file and structured against an attrs class here through the project's one strict converter
(:mod:`mmcore.recipe.convert`: unknown keys, wrong types and non-finite numbers are errors), the
recipe against the recipe schema. A problem is one line naming the file and the field:
``bundles/x/decision.json: temperature: must be > 0 (got 0.0)``. The reference profile
(``reference_profile.safetensors``, or an older bundle's ``reference_profile/`` folder) has its own
strict reader, :func:`mmcore.quality.profile.read_profile` (a bounded safetensors header and summary,
each tensor's dtype and shape checked before any array is read, no pickle), which ``mmcore
export`` applies before copying it and ``mmcore drift`` when it reads it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

import attrs

from mmcore.errors import RecipeError, RunError, os_error_line
from mmcore.validators import FieldError, at_least, in_range, one_of, positive

#: a bundle's JSON files are small (the manifest of a few hundred files is ~100 KB)
MAX_JSON_BYTES = 16 << 20
#: ... and so is its recipe (the recipe loader's own cap)
MAX_RECIPE_BYTES = 1 << 20
GRAPH_FORMATS = ("onnx", "torchscript")
MODALITIES = ("multimodal", "vision_only", "text_only")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(RunError):
    """A bundle file that is missing, unreadable or not what its schema says (one line each)."""


def _sha256(instance, attribute, value):
    if not _SHA256.fullmatch(value):
        raise FieldError(attribute.name, f"must be 64 lowercase hex digits (got {value[:80]!r})")


def _relative_path(instance, attribute, value):
    problem = relative_path_problem(value)
    if problem:
        raise FieldError(attribute.name, problem)


def relative_path_problem(value):
    """Why ``value`` is not a plain relative path inside a folder (``a/b.json``), or None."""
    path = PurePosixPath(value)
    if not value or "\\" in value or "\0" in value:
        return f"must be a relative path with / separators (got {value!r})"
    if path.is_absolute() or ".." in path.parts or path.as_posix() != value:
        return f"must be a plain relative path inside the bundle (got {value!r})"
    return None


@attrs.frozen(kw_only=True)
class FileEntry:
    """One file of the bundle: its sha256 and size, computed once at export."""

    sha256: str = attrs.field(validator=_sha256)
    bytes: int = attrs.field(validator=at_least(0))


@attrs.frozen(kw_only=True)
class GraphInfo:
    """The fused model's graph: which file, which format, its inputs in order."""

    format: str = attrs.field(validator=one_of(*GRAPH_FORMATS))
    file: str = attrs.field(validator=_relative_path)
    inputs: list[str]
    vision_inputs: list[str] = attrs.field(factory=list)
    text_inputs: list[str] = attrs.field(factory=list)
    output: str = "logit"
    opset: int | None = None
    #: the one file holding the ONNX graph's weights when they are over the protobuf limit
    external_data: str | None = attrs.field(default=None, validator=attrs.validators.optional(_relative_path))


@attrs.frozen(kw_only=True)
class EnsembleMemberInfo:
    """One member of an ensemble bundle's graph: its folder in the ensemble directory and its weight."""

    dir: str
    weight: float = attrs.field(validator=in_range(0.0, 1.0, high_inclusive=True))
    experiment: str = ""


@attrs.frozen(kw_only=True)
class EnsembleInfo:
    """``manifest.json``'s ``ensemble``: the members the one graph computes and which encoders they share
    (``shared_encoders["vision"]``: groups of member indexes whose encoder the graph runs once)."""

    members: list[EnsembleMemberInfo]
    shared_encoders: dict[str, list[list[int]]] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class QuantizationInfo:
    """``manifest.json``'s ``quantization`` (int8 bundles): how the graph was quantized, what changed
    (:class:`mmcore.export.quantize.QuantizationRecord`) and the quality gate's figures (``GateResult``)."""

    mode: str = attrs.field(validator=one_of("dynamic", "static"))
    per_channel: bool = False
    calibration_rows: int = attrs.field(default=0, validator=at_least(0))
    #: the node types handed to the quantizer (None: onnxruntime's own list)
    op_types: list[str] | None = None
    record: dict = attrs.field(factory=dict)
    gate: dict = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Manifest:
    """``manifest.json``: format, graph, versions and every other file's sha256 and size."""

    kind: str = attrs.field(validator=one_of("mmcore-bundle"))
    bundle_format: int = attrs.field(validator=at_least(1))
    created: str = ""
    run_dir: str = ""
    experiment: str = ""
    modality: str = attrs.field(validator=one_of(*MODALITIES))
    selected_epoch: int | None = None
    graph: GraphInfo
    versions: dict[str, str] = attrs.field(factory=dict)
    files: dict[str, FileEntry] = attrs.field(factory=dict)
    #: an ensemble's bundle: its members and shared encoders (None for a run's)
    ensemble: EnsembleInfo | None = None
    #: the graph's precision: "int8" graphs (``export --quantize int8``) run on the CPU only
    precision: str = attrs.field(default="fp32", validator=one_of("fp32", "int8"))
    quantization: QuantizationInfo | None = None

    def __attrs_post_init__(self):
        for rel in self.files:
            problem = relative_path_problem(rel)
            if problem:
                raise FieldError("files", problem)


@attrs.frozen(kw_only=True)
class Decision:
    """``decision.json``: the threshold tuned on validation, its rule, the fitted temperature."""

    threshold: float = attrs.field(validator=in_range(0.0, 1.0, high_inclusive=True))
    temperature: float = attrs.field(validator=positive)
    description: str = ""
    rule: str | None = None
    calibrated: bool | None = None
    val_ece_raw: float | None = None
    val_ece_calibrated: float | None = None


def _tokenizer_dir(instance, attribute, value):
    if value is not None and not re.fullmatch(r"tokenizer|tokenizers/text[0-9]+", value):
        raise FieldError(attribute.name, f"must be 'tokenizer' or 'tokenizers/text<i>' (got {value!r})")


def _input_prefix(instance, attribute, value):
    if value and not re.fullmatch(r"text[0-9]+\.", value):
        raise FieldError(attribute.name, f"must be '' or 'text<i>.' (got {value!r})")


#: the token arrays a ``tokenizers`` tokenizer gives (a part whose graph takes others keeps transformers)
FAST_TOKENIZER_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@attrs.frozen(kw_only=True)
class FastTokenizerInfo:
    """A tokenizer part read from ``tokenizer.json`` alone with the ``tokenizers`` library (bundle
    format 5): what transformers took from ``tokenizer_config.json`` to pad and truncate a batch."""

    pad_id: int = attrs.field(validator=at_least(0))
    pad_type_id: int = attrs.field(default=0, validator=at_least(0))
    pad_token: str
    padding_side: str = attrs.field(default="right", validator=one_of("right", "left"))
    truncation_side: str = attrs.field(default="right", validator=one_of("right", "left"))


@attrs.frozen(kw_only=True)
class TextPartInfo:
    """One text part of the text side: a tokenizer (prefix, max_length, folder) or a host featurizer."""

    name: str = ""
    input_prefix: str = attrs.field(default="", validator=_input_prefix)
    inputs: list[str] = attrs.field(factory=list)
    prefix: str = ""
    max_length: int | None = attrs.field(default=None, validator=attrs.validators.optional(at_least(1)))
    tokenizer: str | None = attrs.field(default=None, validator=_tokenizer_dir)
    featurizer: dict | None = None
    fast_tokenizer: FastTokenizerInfo | None = None

    def __attrs_post_init__(self):
        if self.featurizer is None and self.max_length is None:
            raise FieldError("max_length", "missing required key (a tokenizer part needs it)")


@attrs.frozen(kw_only=True)
class TextInfo:
    """The text side (``inputs.json``'s ``text``; ``text.json`` in formats 1 to 3): one part (the
    format-1 layout: its keys at the top level) or ``parts`` of a concat."""

    name: str = ""
    inputs: list[str] = attrs.field(factory=list)
    prefix: str = ""
    max_length: int | None = attrs.field(default=None, validator=attrs.validators.optional(at_least(1)))
    featurizer: dict | None = None
    fast_tokenizer: FastTokenizerInfo | None = None
    parts: list[TextPartInfo] | None = None

    def __attrs_post_init__(self):
        if self.parts is None and self.featurizer is None and self.max_length is None:
            raise FieldError("max_length", "missing required key (a tokenizer part needs it)")


@attrs.frozen(kw_only=True)
class InputsInfo:
    """``inputs.json`` (bundle format 4): how the host turns an image and a text into the graph's inputs.

    ``vision``: the preprocessing as data (its class by registry name, fields, describe), rebuilt
    by :func:`mmcore.export.bundle.rebuild_preprocessing`; ``text``: the text side (what
    ``text.json`` held in formats 1 to 3). A modality the model does not read has no key.
    """

    vision: dict | None = None
    text: TextInfo | None = None


def read_bounded(path, *, limit, what):
    """The bytes of regular file ``path``, at most ``limit`` of them; anything else is one line."""
    path = Path(path)
    try:
        # opened without blocking (a FIFO would wait for a writer), then checked on the open file itself
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise BundleError(f"{path}: {what} is not a regular file")
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing ({what}); export the run again") from None
    except OSError as exc:
        raise BundleError(os_error_line(path, exc, what=what)) from None
    if len(data) > limit:
        raise BundleError(f"{path}: {what} is larger than {limit >> 20} MiB; not a file mmcore export wrote")
    return data


def read_json(path, *, what):
    """A bounded JSON file whose top level is an object (a NaN it holds is refused by the schema, naming the field)."""
    return parse_json(read_bounded(path, limit=MAX_JSON_BYTES, what=what), path=path, what=what)


def parse_json(data, *, path, what):
    """The bytes of JSON file ``path`` -> its top-level object, or one line naming the file."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:200] if not isinstance(exc, RecursionError) else "nested too deeply"
        raise BundleError(f"{path}: {what} is not JSON ({reason})") from None
    if not isinstance(value, dict):
        raise BundleError(f"{path}: {what} must be a JSON object (got {type(value).__name__})")
    return value


def structure_file(data, cls, *, path, at=""):
    """``data`` from file ``path`` structured into ``cls``; each problem one line naming the file and field."""
    from mmcore.recipe.convert import structure

    try:
        return structure(data, cls, source=str(path), path=at)
    except RecipeError as exc:
        lines = [line.replace(": : ", ": ", 1) for line in exc.problems]
        raise BundleError("\n".join(lines)) from None


def read_recipe(path):
    """``recipe.toml`` -> ``(data, recipe)``: the plain data and the :class:`~mmcore.recipe.Recipe` it
    structures into (checked against the recipe schema; components' params are not resolved)."""
    import tomllib

    from mmcore.recipe.schema import Recipe

    text = read_bounded(path, limit=MAX_RECIPE_BYTES, what="the run's recipe")
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: the run's recipe is not TOML ({' '.join(str(exc).split())[:200]})") from None
    return data, structure_file(data, Recipe, path=path)
