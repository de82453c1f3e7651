"""TOML recipes -> frozen attrs classes, through ONE strict cattrs converter.

``load_recipe(path, overrides)`` reads the file, follows ``extends`` (deep merge, paths
relative to the file), applies ``--set key.path=value`` overrides, expands ``${ENV_VAR}``,
structures everything (unknown keys and wrong types are errors), then structures each
component's ``params`` against the params class its plugin registered. Every problem is
reported as one line: ``recipes/x.toml: train.lr: unknown key (did you mean learning_rate?)``.
"""


from __future__ import annotations

import os
from pathlib import Path

import attrs
import tomllib

from mmcore.bounded import MAX_NESTING, FileRules, NestingError, loads_toml, nesting_depth, read_regular_file
from mmcore.errors import RecipeError
from mmcore.plugins.registry import UnknownComponentError
from mmcore.recipe.convert import Source, _join, src, structure, unstructure
from mmcore.recipe.schema import COMPONENT_KINDS, ENV_RE, Component, DataConfig, Recipe

#: a recipe is a small text file; anything bigger is a mistake (``extends = "/dev/zero"``)
MAX_RECIPE_BYTES = 1 << 20
RECIPE_FILE_RULES = FileRules("recipe file", "a TOML recipe file", MAX_RECIPE_BYTES, "a recipe is a small TOML file")


def _read_recipe_text(path, where):
    """The text of a recipe file; a missing, non-regular, unreadable or oversized one is one line.

    ``where`` is the start of the line (``PARENT: extends``), None for the recipe named on the
    command line. Only regular files are opened (a FIFO would block, a device read forever),
    and at most ``MAX_RECIPE_BYTES``.
    """
    data = read_regular_file(path, RECIPE_FILE_RULES, where=where, error=RecipeError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_toml(path, chain=()):
    path = Path(path)
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise RecipeError(f"{chain[-1] if chain else path}: extends: cycle ({cycle})")
    if len(chain) >= MAX_NESTING:  # each level is a recursion here and in deep_merge
        raise RecipeError(f"{chain[-1]}: extends: more than {MAX_NESTING} recipes extend one another")
    text = _read_recipe_text(path, f"{chain[-1]}: extends" if chain else None)
    data = _parse_toml(text, path)
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


def split_values(text):
    """``"a,[1,2],'x,y'"`` -> ``["a", "[1,2]", "'x,y'"]``: commas inside brackets/quotes stay
    (the values of ``--sweep KEY=V1,V2`` and of ``--sampler NAME:k=v,...``)."""
    values, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def parse_override(text):
    """``"train.batch_size=32"`` -> (["train", "batch_size"], 32); values are TOML, else strings.

    A ``(key, value)`` pair (the Python API's ``overrides={"train.epochs": 5}``) is checked the same way."""
    if not isinstance(text, str):
        key, value = text
        return _override_parts(str(key), f"{key}={value!r}"), _bounded_value(str(key).split("."), value, str(key))
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = _override_parts(key, text)
    try:
        value = loads_toml(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except NestingError:
        value = None  # refused just below, with the key
    return parts, _bounded_value(parts, value, key)


def _override_parts(key, text):
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text}: expected KEY.PATH=VALUE")
    parts = key.split(".")
    if len(parts) > MAX_NESTING:
        raise RecipeError(f"--set {key[:60]}...: a key path of {len(parts)} parts; recipe keys nest at most {MAX_NESTING} deep")
    return parts


def _bounded_value(parts, value, key):
    if value is None or len(parts) + nesting_depth(value) > MAX_NESTING:
        raise RecipeError(f"--set {key}: the value is nested more than {MAX_NESTING} levels deep (with its key path)")
    return value


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
        if parts[0] in COMPONENT_KINDS and len(parts) > 2 and "name" not in data[parts[0]]:
            # a param of a component the recipe leaves at its default: that default is meant
            data[parts[0]]["name"] = default_component_name(parts[0])
        node[parts[-1]] = value
        keys.append(".".join(parts))
    return data, keys


def default_component_name(kind):
    """The component a recipe gets when it has no ``[kind]`` table (``scheduler`` -> ``cosine_warmup``)."""
    default = attrs.fields_dict(Recipe)[kind].default
    return default.factory().name


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
    return _load_raw(_read_toml(path), path, overrides, registry=registry, strict_env=strict_env)


def recipe_from_source(recipe, overrides=(), *, registry=None, strict_env=True):
    """A recipe given as a path (``str`` or ``os.PathLike``), TOML text (a ``str`` holding a newline)
    or a dict, loaded as :func:`load_recipe` loads a file: the same strict converter, the same
    one-line problems (``<recipe>: train.lr: unknown key ...`` for text and dicts). An ``extends``
    in text or a dict is relative to the current directory."""
    if isinstance(recipe, dict):
        return _load_raw(_bounded_data(recipe), "<recipe>", overrides, registry=registry, strict_env=strict_env)
    if isinstance(recipe, str) and "\n" in recipe:
        if len(recipe.encode("utf-8")) > MAX_RECIPE_BYTES:
            raise RecipeError(f"<recipe>: more than {MAX_RECIPE_BYTES} bytes of TOML; a recipe is a small TOML file")
        data = _parse_toml(recipe, "<recipe>")
        return _load_raw(_bounded_data(data), "<recipe>", overrides, registry=registry, strict_env=strict_env)
    return load_recipe(recipe, overrides, registry=registry, strict_env=strict_env)


def _bounded_data(data):
    """A recipe dict of bounded nesting, its ``extends`` (relative to the current directory) merged in."""
    if nesting_depth(data) > MAX_NESTING:
        raise RecipeError(f"<recipe>: nested more than {MAX_NESTING} levels deep")
    data = deep_merge({}, data)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError("<recipe>: extends: must be a string (a path relative to the current directory)")
    return deep_merge(_read_toml(Path(parent)), data)


def _load_raw(raw, path, overrides, *, registry=None, strict_env=True):
    """Override, expand and structure recipe data read from ``path`` (what messages name)."""
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
        from mmcore.plugins.manager import get_registry

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
        problems.extend(_check_metadata(recipe, resolved, source, registry))
    if problems:
        raise RecipeError(problems)
    recipe = attrs.evolve(recipe, **resolved)
    if check_modality:
        _check_size(recipe, source, registry)
    return recipe


def _check_size(recipe, source, registry):
    """Parameters that cannot fit in memory even behind the narrowest encoders: refused at load,
    before anything is built (building measures again, with the encoders' real widths)."""
    from mmcore.model.size import size_problem

    modality = recipe.train.modality
    problem = size_problem(
        recipe, registry, source=source, lower_bound=True, has_cls_token=True,
        vision_dim=1 if modality != "text_only" else None, text_dim=1 if modality != "vision_only" else None,
    )
    if problem:
        raise RecipeError(problem)


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


def _check_metadata(recipe, resolved, source, registry):
    """Checks that need only what the plugins declared (their traits), no model: done at load, so
    ``mmcore show`` reports them and ``mmcore run`` stops before the run directory exists."""
    from mmcore.builtin.pooling import cls_token_problem
    from mmcore.model.trainability import fixed_extractor_problem

    vision, pooling = resolved.get("vision"), resolved.get("pooling")
    if vision is None or recipe.train.modality == "text_only":
        return []
    traits = registry.get("vision", vision.name).traits_for(vision.params)
    problems = []
    if traits.trainable is False:  # a fixed feature extractor
        train = recipe.train
        problem = fixed_extractor_problem(
            repr(vision.name), freeze_backbone=train.freeze_backbone, finetune_layers=train.finetune_layers,
            lora_enabled=train.lora.enabled,
        )
        if problem:
            problems.append(f"{src(source, problem[0])}: {problem[1]}")
    if pooling is not None and pooling.name == "cls" and traits.has_cls_token is False:
        problems.append(f"{src(source, 'pooling.name')}: pooling.name: {cls_token_problem(f'vision encoder {vision.name!r}')}")
    return problems


def recipe_to_dict(recipe):
    """The fully resolved recipe as plain data (what ``mmcore show`` prints and runs save)."""
    return unstructure(recipe)


def recipe_to_toml(recipe):
    import tomli_w

    return tomli_w.dumps(recipe_to_dict(recipe))


def recipe_diff(a, b, prefix="", *, added_ok=False):
    """Dotted key paths whose values differ between two recipe dicts.

    ``added_ok``: keys that only ``b`` has are not differences (``a`` was written by an mmcore
    that did not know them, and ``b`` holds their defaults)."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        path = f"{prefix}{key}"
        if added_ok and key not in a:
            continue
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out.extend(recipe_diff(a[key], b[key], path + ".", added_ok=added_ok))
        elif a.get(key) != b.get(key):
            out.append(path)
    return out


def _parse_toml(text, where):
    """``text`` as TOML (bounded nesting); a problem is one RecipeError line naming ``where``."""
    try:
        return loads_toml(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where}: invalid TOML: {exc}") from None
    except NestingError as exc:
        raise RecipeError(f"{where}: {exc}") from None
