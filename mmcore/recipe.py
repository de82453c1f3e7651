"""TOML recipes -> frozen attrs classes, through ONE strict cattrs converter.

``load_recipe(path, overrides)`` reads the file, follows ``extends`` (deep merge, paths
relative to the file), applies ``--set key.path=value`` overrides, expands ``${ENV_VAR}``,
structures everything (unknown keys and wrong types are errors), then structures each
component's ``params`` against the params class its plugin registered. Every problem is
reported as one line: ``recipes/x.toml: train.lr: unknown key (did you mean learning_rate?)``.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any

import attrs
import cattrs
import tomllib
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from .errors import RecipeError, did_you_mean
from .registry import UnknownComponentError
from .trainability import LoraConfig
from .validators import FieldError, at_least, in_range, one_of, positive

MODALITIES = ("multimodal", "vision_only", "text_only")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@attrs.frozen(kw_only=True)
class Component:
    """A registered component by name, with its params (structured against its params class)."""

    name: str
    params: Any = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class OcrConfig:
    """Fill empty ``text_info`` on the fly with an OCR engine (cached by image content)."""

    engine: str = "tesseract"
    lang: str = "kor+eng"


@attrs.frozen(kw_only=True)
class DataConfig:
    """Where the CSVs and images are, and how the loader reads them."""

    base_dir: str = "${DATA_DIR}"
    train: str = "train.csv"
    val: str = "val.csv"
    test: str = "test.csv"
    #: loader worker processes; -1 = one per CPU core
    num_workers: int = attrs.field(default=-1, validator=at_least(0, allow=(-1,)))
    on_bad_image: str = attrs.field(default="error", validator=one_of("error", "skip"))
    #: images with more pixels are refused (decompression-bomb guard)
    max_image_pixels: int = attrs.field(default=89_478_485, validator=positive)
    ocr: OcrConfig | None = None


@attrs.frozen(kw_only=True)
class EarlyStopping:
    """Stop when ``metric`` has not improved for ``patience`` epochs (0 = never stop early)."""

    patience: int = attrs.field(default=3, validator=at_least(0))
    metric: str = "val_auroc"


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Training keys; the defaults are the original system's."""

    modality: str = attrs.field(default="multimodal", validator=one_of(*MODALITIES))
    freeze_backbone: bool = True
    #: 0 = all frozen, N = top N blocks trainable, -1 = all
    finetune_layers: int = attrs.field(default=0, validator=at_least(0, allow=(-1,)))
    lora: LoraConfig = attrs.field(factory=LoraConfig)
    epochs: int = attrs.field(default=10, validator=positive)
    batch_size: int = attrs.field(default=32, validator=positive)
    learning_rate: float = attrs.field(default=1e-4, validator=positive)
    backbone_lr: float = attrs.field(default=1e-5, validator=positive)
    lora_lr: float = attrs.field(default=1e-4, validator=positive)
    weight_decay: float = attrs.field(default=0.01, validator=at_least(0))
    grad_accum_steps: int = attrs.field(default=1, validator=positive)
    #: max gradient norm; 0 disables clipping
    grad_clip: float = attrs.field(default=1.0, validator=at_least(0))
    precision: str = attrs.field(default="auto", validator=one_of("auto", "bf16", "fp32"))
    device: str = "auto"
    deterministic: bool = False
    #: linear projection before the head in vision_only / text_only (0 = none)
    projection_dim: int = attrs.field(default=0, validator=at_least(0))
    #: probability of dropping one modality per sample during training (multimodal)
    modality_dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))
    balanced_sampler: bool = False
    on_nan: str = attrs.field(default="stop", validator=one_of("stop", "skip"))
    #: also write last.ckpt every N optimizer steps (0 = only at epoch ends)
    checkpoint_every_steps: int = attrs.field(default=0, validator=at_least(0))
    early_stopping: EarlyStopping = attrs.field(factory=EarlyStopping)


def _threshold_rule(instance, attribute, value):
    from .evaluation.threshold import parse_threshold_rule

    try:
        parse_threshold_rule(value)
    except (ValueError, TypeError) as exc:
        raise FieldError(attribute.name, str(exc)) from None


@attrs.frozen(kw_only=True)
class EvalConfig:
    """Decision threshold (tuned on validation) and calibration."""

    #: "f1" | "youden" | {precision = 0.95} | {recall = 0.9} | a number in (0, 1)
    threshold: Any = attrs.field(default="f1", validator=_threshold_rule)
    calibrate: bool = True
    batch_size: int = attrs.field(default=0, validator=at_least(0))


@attrs.frozen(kw_only=True)
class CacheConfig:
    """Feature cache for frozen encoders with deterministic input."""

    enabled: bool = True
    #: "" = the user's cache directory (~/.cache/mmcore or $MMCORE_CACHE_DIR)
    dir: str = ""


@attrs.frozen(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "mmcore"
    progress: bool = True


def _component(name, **params):
    return attrs.field(factory=lambda: Component(name=name, params=dict(params)))


@attrs.frozen(kw_only=True)
class Recipe:
    """A whole experiment: data, components, training, evaluation, outputs."""

    experiment: str = "default"
    description: str = ""
    seed: int = 42
    output_dir: str = "runs"
    data: DataConfig = attrs.field(factory=DataConfig)
    vision: Component = _component("siglip2_so400m")
    text: Component = _component("labse")
    pooling: Component = _component("attention")
    fusion: Component = _component("gated")
    head: Component = _component("mlp")
    loss: Component = _component("focal")
    scheduler: Component = _component("cosine_warmup")
    augmentation: Component = _component("none")
    train: TrainConfig = attrs.field(factory=TrainConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    cache: CacheConfig = attrs.field(factory=CacheConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)


#: recipe key -> registry kind, for every component table
COMPONENT_KINDS = {
    "vision": "vision",
    "text": "text",
    "pooling": "pooling",
    "fusion": "fusion",
    "head": "head",
    "loss": "loss",
    "scheduler": "scheduler",
    "augmentation": "augmentation",
}


# ---------------------------------------------------------------- the converter


class StrictTypeError(TypeError):
    pass


def _type_name(value):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _strict(expected, name):
    def hook(value, _type):
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not expected:
            raise StrictTypeError(f"must be {name} (got {_type_name(value)} {value!r})")
        return value

    return hook


def _is_plain_union(tp):
    return typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType"))


def _make_converter():
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(bool, _strict(bool, "a boolean"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict(float, "a number"))
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(Any, lambda value, _t: value)

    def structure_union(value, tp):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return conv.structure(value, member)
            except Exception as exc:  # try the next member
                errors.append(exc)
        names = " or ".join(_union_member_name(m) for m in members if m is not type(None))
        raise StrictTypeError(f"must be {names} (got {_type_name(value)} {value!r})")

    conv.register_structure_hook_func(_is_plain_union, structure_union)
    conv.register_unstructure_hook(tuple, list)
    return conv


def _union_member_name(tp):
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if attrs.has(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


converter = _make_converter()


def _problems(exc, path):
    """Yield (key_path, message) for every leaf of a cattrs error tree."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields):
            yield _join(path, key), f"unknown key{did_you_mean(key, known)}"
        return
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _problems(sub, _join(path, str(getattr(note, "name", getattr(note, "index", "")))))
        for sub in without:
            yield from _problems(sub, path)
        return
    if isinstance(exc, FieldError):
        yield _join(path, exc.field), str(exc)
        return
    if isinstance(exc, KeyError):
        key = str(exc.args[0])
        yield (path if path.rpartition(".")[2] == key else _join(path, key)), "missing required key"
        return
    if isinstance(exc, (StrictTypeError, ValueError, TypeError)):
        message = str(exc)
        if isinstance(exc, TypeError) and "unexpected keyword" in message:
            message = "unknown key"
        if not isinstance(exc, StrictTypeError) and type(exc) is TypeError:
            message = f"wrong type ({message})"
        yield path, message
        return
    yield path, f"{type(exc).__name__}: {exc}"


def _join(path, key):
    return f"{path}.{key}" if path else key


def structure(data, cls, *, source, path=""):
    """Structure ``data`` into ``cls`` or raise a :class:`RecipeError` naming each key path."""
    try:
        return converter.structure(data, cls)
    except Exception as exc:
        problems = [f"{src(source, p)}: {p}: {m}" for p, m in _problems(exc, path)]
        raise RecipeError(problems or [f"{source}: {path}: {exc}"]) from None


def unstructure(obj):
    """attrs -> plain dict (None values dropped: TOML has no null)."""
    return _drop_none(converter.unstructure(obj, unstructure_as=type(obj)))


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    if attrs.has(type(value)):
        return _drop_none(converter.unstructure(value, unstructure_as=type(value)))
    return value


# ---------------------------------------------------------------- loading


class Source:
    """Where each key came from: the recipe file, or a --set override."""

    def __init__(self, path, override_keys=()):
        self.path = str(path)
        self.override_keys = set(override_keys)

    def __call__(self, key_path):
        for key in self.override_keys:
            if key_path == key or key_path.startswith(key + ".") or key.startswith(key_path + "."):
                return f"{self.path} (--set {key})"
        return self.path


def src(source, key_path):
    return source(key_path) if callable(source) else str(source)


def _read_toml(path, chain=()):
    path = Path(path)
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise RecipeError(f"{chain[-1] if chain else path}: extends: cycle ({cycle})")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = f"{chain[-1]}: extends" if chain else f"{path}"
        raise RecipeError(f"{where}: recipe file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: invalid TOML: {exc}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: must be a string (a path relative to this file)")
    base = _read_toml(path.parent / parent, (*chain, path.resolve()))
    return deep_merge(base, data)


def deep_merge(base, override):
    """Tables merge key by key; anything else in ``override`` replaces ``base``."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text):
    """``"train.batch_size=32"`` -> (["train", "batch_size"], 32); values are TOML, else strings."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text}: expected KEY.PATH=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data, overrides):
    """Set each ``key.path=value`` into the nested dict (a component name change resets params)."""
    data = deep_merge({}, data)
    keys = []
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        if (
            len(parts) == 2
            and parts[1] == "name"
            and parts[0] in COMPONENT_KINDS
            and node.get("name") != value
        ):
            node.pop("params", None)  # another component's params would not fit the new one
        node[parts[-1]] = value
        keys.append(".".join(parts))
    return data, keys


def expand_env(data, source, strict=True, path=""):
    """Replace ``${VAR}`` in every string; an unset variable is an error naming the key."""
    if isinstance(data, dict):
        return {k: expand_env(v, source, strict, _join(path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, source, strict, f"{path}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str):

        def replace(match):
            name = match.group(1)
            if name in os.environ:
                return os.environ[name]
            if strict:
                raise RecipeError(
                    f"{src(source, path)}: {path}: environment variable {name} is not set "
                    f"(export {name}=... or --set {path}=...)"
                )
            return match.group(0)

        return ENV_RE.sub(replace, data)
    return data


def load_recipe(path, overrides=(), *, registry=None, strict_env=True):
    """Read, merge, override, expand and structure a recipe; resolve component params."""
    raw = _read_toml(path)
    raw, override_keys = apply_overrides(raw, overrides)
    source = Source(path, override_keys)
    if isinstance(raw.setdefault("data", {}), dict):
        raw["data"].setdefault("base_dir", DataConfig().base_dir)  # so ${DATA_DIR} expands too
    raw = expand_env(raw, source, strict=strict_env)
    return _structure_all(raw, source, registry)


def _structure_all(raw, source, registry):
    """Structure the recipe and its components, reporting every problem of both, in file order."""
    try:
        recipe = structure(raw, Recipe, source=source)
    except RecipeError as exc:
        problems = list(exc.problems)
        # still check the components, so one run of `mmcore show` lists everything
        partial = {k: v for k, v in raw.items() if k in COMPONENT_KINDS and isinstance(v, dict)}
        try:
            candidate = structure(partial, Recipe, source=source)
            resolve_components(candidate, source, registry=registry, check_modality=False)
        except RecipeError as more:
            problems.extend(more.problems)
        raise RecipeError(_in_file_order(problems, raw)) from None
    try:
        return resolve_components(recipe, source, registry=registry)
    except RecipeError as exc:
        raise RecipeError(_in_file_order(exc.problems, raw)) from None


def _in_file_order(problems, raw):
    """Sort problem lines by where their key path appears in the recipe data."""
    order = {}

    def walk(node, prefix):
        for key, value in node.items():
            path = _join(prefix, key)
            order.setdefault(path, len(order))
            if isinstance(value, dict):
                walk(value, path)

    walk(raw, "")

    def position(line):
        parts = line.split(": ")
        path = parts[1] if len(parts) > 2 else ""
        while path and path not in order:
            path = path.rpartition(".")[0]
        return order.get(path, len(order))

    return sorted(dict.fromkeys(problems), key=position)


def recipe_from_dict(data, *, source="<recipe>", registry=None):
    """Structure an already-merged dict (a run's saved recipe)."""
    return _structure_all(data, source, registry)


def resolve_components(recipe, source, *, registry=None, check_modality=True):
    """Structure each component's params against the params class its plugin registered."""
    if registry is None:
        from .plugins import get_registry

        registry = get_registry()
    problems = []
    resolved = {}
    for key, kind in COMPONENT_KINDS.items():
        component = getattr(recipe, key)
        try:
            registration = registry.get(kind, component.name)
        except UnknownComponentError as exc:
            problems.append(f"{src(source, key + '.name')}: {key}.name: {exc}")
            continue
        params = component.params
        if isinstance(params, registration.params_cls):
            resolved[key] = component
            continue
        if not isinstance(params, dict):
            problems.append(f"{src(source, key + '.params')}: {key}.params: must be a table")
            continue
        try:
            structured = structure(params, registration.params_cls, source=source, path=f"{key}.params")
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        except Exception as exc:  # a plugin's own validator
            problems.append(f"{src(source, key + '.params')}: {key}.params: {exc}")
            continue
        resolved[key] = Component(name=component.name, params=structured)
    ocr = recipe.data.ocr
    if ocr is not None and not registry.has("ocr", ocr.engine):
        problems.append(f"{src(source, 'data.ocr.engine')}: data.ocr.engine: {registry.unknown_message('ocr', ocr.engine)}")
    if check_modality:
        problems.extend(_check_modality(recipe, source))
    if problems:
        raise RecipeError(problems)
    return attrs.evolve(recipe, **resolved)


def _check_modality(recipe, source):
    modality = recipe.train.modality
    if modality == "multimodal" and recipe.text.name == "none":
        return [
            f"{src(source, 'text.name')}: text.name: 'none' needs train.modality = "
            f"\"vision_only\" (got \"multimodal\")"
        ]
    if modality == "text_only" and recipe.text.name == "none":
        return [f"{src(source, 'text.name')}: text.name: text_only needs a text encoder (got 'none')"]
    return []


def recipe_to_dict(recipe):
    """The fully resolved recipe as plain data (what ``mmcore show`` prints and runs save)."""
    return unstructure(recipe)


def recipe_to_toml(recipe):
    import tomli_w

    return tomli_w.dumps(recipe_to_dict(recipe))


def recipe_diff(a, b, prefix=""):
    """Dotted key paths whose values differ between two recipe dicts."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        path = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out.extend(recipe_diff(a[key], b[key], path + "."))
        elif a.get(key) != b.get(key):
            out.append(path)
    return out
