"""Will the model's parameters fit in memory? Measured before a byte of them is allocated.

``--set fusion.params.dim=1000000000`` would otherwise end in an allocator traceback. The parts
after the encoders (pooling, fusion or projection, head) are built on PyTorch's ``meta`` device
— shapes without storage — and their parameter bytes compared with the memory this process may
still use (the model is built on the host first). A model that cannot fit is one line naming
the recipe key that made it so: the param of the largest part whose default would shrink it
most (``fusion.params.dim``).

The recipe check (``mmcore show``, ``mmcore run`` before the run directory exists) knows no
encoder yet, so it measures with encoders one value wide: a lower bound ("at least"). Building
the model measures again with the real widths, before anything is allocated.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import torch

from mmcore.errors import MmcoreError
from mmcore.model.components import build_top

GIB = 1 << 30
#: the key a refusal names when no param of the part is to blame
PART_KEYS = {"pooling": "pooling.name", "fusion": "fusion.name", "projection": "train.projection_dim", "head": "head.name"}


def parameter_bytes(module):
    """Bytes of a module's parameters (meta tensors included: their size, not their storage); 0 for
    what is not a module (a factory that returns something else is the real build's to report)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def available_memory():
    """Bytes this process may still allocate: the system's available memory, within the cgroup's
    limit where one is set (containers); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def size_problem(recipe, registry, *, vision_dim, text_dim, has_cls_token, source="recipe", lower_bound=False, available=None):
    """The one line saying the model's parameters cannot fit, or None (also when they cannot be measured).

    ``vision_dim``/``text_dim`` are the encoders' widths (None for a modality the recipe leaves
    out); ``lower_bound``: they are stand-ins, so the figure is "at least". ``available``: bytes
    (default: :func:`available_memory`).
    """
    available = available_memory() if available is None else available
    dims = {"vision_dim": vision_dim, "text_dim": text_dim, "has_cls_token": has_cls_token}
    sizes = _part_bytes(recipe, registry, dims)
    if available is None or sizes is None or sum(sizes.values()) <= available:
        return None
    key = _culprit(recipe, registry, dims, sum(sizes.values())) or PART_KEYS[max(sizes, key=sizes.get)]
    at_least = "at least " if lower_bound else ""
    return (
        f"{_src(source, key)}: {key}: the model needs {at_least}{sum(sizes.values()) / GIB:.1f} GiB of parameters, "
        f"{available / GIB:.1f} GiB of memory available; make it smaller"
    )


def _part_bytes(recipe, registry, dims):
    """``{part: parameter bytes}`` of the parts after the encoders, built on the meta device; None
    when a part cannot be built so (its factory refuses these widths, or needs real tensors) or
    builds something that is not a module (the real build says what is wrong with it)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            parts = build_top(recipe, registry, **dims)
    except MmcoreError:  # the real build reports what is wrong with the recipe or the plugin
        return None
    if not all(isinstance(module, torch.nn.Module) for module in parts.values() if module is not None):
        return None
    return {name: parameter_bytes(module) for name, module in parts.items() if module is not None}


def _culprit(recipe, registry, dims, total):
    """The key whose default shrinks the model most (``fusion.params.dim``), or None.

    Every param that differs from its default is tried, in every part: a fusion's width makes
    the head after it wide too, so the part with the most bytes is not always the one to blame.
    """
    best, key = total, None
    for candidate, smaller in _defaults_one_at_a_time(recipe):
        sizes = _part_bytes(smaller, registry, dims)
        if sizes is not None and sum(sizes.values()) < best:
            best, key = sum(sizes.values()), candidate
    return key


def _defaults_one_at_a_time(recipe):
    """``(key path, the recipe with that key at its default)`` for each key of the parts that is not."""
    for part, table in _tables(recipe).items():
        for field in attrs.fields(type(table.params)):
            default = _default(field, table.params)
            if default is attrs.NOTHING or default == getattr(table.params, field.name):
                continue
            try:
                params = attrs.evolve(table.params, **{field.name: default})
            except ValueError:  # the default does not fit with the other params (a cross-field check)
                continue
            yield f"{part}.params.{field.name}", attrs.evolve(recipe, **{part: attrs.evolve(table, params=params)})
    train = recipe.train
    default = _default(attrs.fields(type(train)).projection_dim, train)
    if train.projection_dim != default:
        yield PART_KEYS["projection"], attrs.evolve(recipe, train=attrs.evolve(train, projection_dim=default))


def _tables(recipe):
    """The recipe tables of the parts built from plugins."""
    return {"pooling": recipe.pooling, "fusion": recipe.fusion, "head": recipe.head}


def _default(field, params):
    default = field.default
    if isinstance(default, attrs.Factory):
        return default.factory(params) if default.takes_self else default.factory()
    return default


def _src(source, key):
    return source(key) if callable(source) else str(source)
