"""The cache directory's tenants, and ``mmcore cache verify | info | clear`` over every one of them.

Each tenant is declared once in :data:`TENANTS`: its name, its folders under the cache root,
the version of its entries' format, and how ``verify`` checks them. Adding a tenant (teacher
logits, out-of-fold scores, resumable scoring chunks) is adding a row; ``info`` then shows it,
``clear --all`` empties it, ``clear --tenant NAME`` empties it alone and ``verify`` checks its
entries and the temporary files killed writes left in its folders.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from mmcore.errors import os_error_line
from mmcore.store.chunks import CHUNK_FORMAT
from mmcore.store.facts import CHECKS_DIR, verify_file_facts
from mmcore.store.features import FEATURES_DIR
from mmcore.store.leftovers import is_leftover
from mmcore.store.ocr import OCR_DIR, OCR_VERSION, verify_ocr
from mmcore.store.records import FILES_DIR
from mmcore.store.spaces import count_spaces, remove_spaces, verify_features
from mmcore.store.root import FORMAT
from mmcore.store.teacher import TEACHER_DIR, TEACHER_VERSION, verify_teacher


@attrs.frozen(kw_only=True)
class Tenant:
    """One kind of entry the cache directory holds."""

    #: its name for ``mmcore cache clear --tenant``
    name: str
    #: what ``info`` and ``clear`` call it
    title: str
    #: its folders, relative to the cache root
    paths: tuple[str, ...]
    #: the version of its entries' format, recorded in each entry (None: the module that writes
    #: them records its own, e.g. ``mmcore.data.webdataset.INDEX_VERSION``)
    version: int | None
    #: ``verify(root, checkup)``: checks every entry, counting into and reporting to the :class:`Checkup`
    verify: Callable | None = None
    #: what ``verify`` says it checked, from the checkup's counts (``str.format`` fields)
    summary: str = ""
    #: ``count(root)``: how many entries it holds, for ``info`` and ``clear`` (None: they give the size only)
    count: Callable | None = None


def count_files(pattern):
    """A tenant's ``count``: the files matching ``pattern`` in its folders."""

    def count(root, paths):
        return sum(1 for relative in paths for _ in (Path(root) / relative).glob(pattern))

    return count


TENANTS = (
    Tenant(name="features", title="feature spaces", paths=(FEATURES_DIR,), version=CHUNK_FORMAT, verify=verify_features,
           summary="{spaces} feature spaces, {chunks} sound chunks ({entries} entries)",
           count=count_spaces),
    Tenant(name="file-facts", title="file facts", paths=(FILES_DIR, CHECKS_DIR), version=1, verify=verify_file_facts,
           summary="{file_hash_records} file-hash records, {image_check_records} image-check records"),
    Tenant(name="ocr", title="OCR texts", paths=(OCR_DIR,), version=OCR_VERSION, verify=verify_ocr,
           summary="{ocr_texts} OCR texts", count=count_files("*.json")),
    Tenant(name="shard-indexes", title="shard indexes", paths=(f"{FORMAT}/shards",), version=None, count=count_files("*/*.json")),
    Tenant(name="copied-shards", title="copied shards", paths=(f"{FORMAT}/spool",), version=None, count=count_files("*.tar")),
    Tenant(name="teacher-logits", title="teacher logits", paths=(TEACHER_DIR,), version=TEACHER_VERSION,
           verify=verify_teacher, summary="{teacher_record_files} teacher-logit record files",
           count=count_files("*/*.npy")),
)


def tenant(name):
    """The :class:`Tenant` named ``name``."""
    return next(t for t in TENANTS if t.name == name)


class Checkup:
    """What ``verify`` found: counts by name, one line per problem, and the files each names."""

    def __init__(self, now=None):
        self.now = time.time() if now is None else now
        self.counts = {}
        self.problems = []
        self.remove = []

    def count(self, what, n=1):
        """Add ``n`` to the count ``what``."""
        self.counts[what] = self.counts.get(what, 0) + n

    def problem(self, line, *paths):
        """Report ``line``; ``--repair`` removes ``paths`` (a run would compute those entries again)."""
        self.problems.append(line)
        self.remove.extend(paths)


class _Zero(dict):
    def __missing__(self, key):
        return 0


def verify_cache(root, *, repair=False):
    """Check every tenant -> ``{"summary", "counts", "problems", "repaired", "remaining"}``.

    ``problems`` are lines naming each damaged file (chunks that do not match their index,
    damaged records, an unreadable ``meta.json``) and leftovers (a data file without index,
    temporary files of killed writes). With ``repair`` they are removed (a run would compute
    the entries again) and counted in ``repaired``; ``remaining`` counts the problems still
    there afterwards. ``summary``: what was checked, in words.
    """
    root = Path(root)
    checkup = Checkup()
    for t in TENANTS:
        if t.verify is not None:
            t.verify(root, checkup)
    for top in sorted({Path(p).parts[0] for t in TENANTS for p in t.paths}):
        folder = root / top
        for tmp in sorted(folder.rglob(".*.tmp")) if folder.is_dir() else []:
            if is_leftover(tmp, checkup.now):
                checkup.problem(f"{tmp}: temporary file of an interrupted write", tmp)
    counts = _Zero(checkup.counts)
    report = {
        "summary": ", ".join(t.summary.format_map(counts) for t in TENANTS if t.summary),
        "counts": dict(checkup.counts),
        "problems": list(checkup.problems),
        "repaired": 0,
        "remaining": len(checkup.problems),
    }
    if repair:
        failed = []
        for path in dict.fromkeys(checkup.remove):
            try:
                Path(path).unlink()
                report["repaired"] += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append(os_error_line(path, exc, what="cannot remove"))
        report["problems"].extend(failed)
        report["remaining"] = len(failed)
    return report


def _size(root, t):
    folders = [Path(root) / relative for relative in t.paths]
    return sum(p.stat().st_size for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.is_file())


def _describe(root, t):
    return {"name": t.name, "title": t.title, "version": t.version, "bytes": _size(root, t),
            "entries": t.count(root, t.paths) if t.count is not None else None}


def tenants_info(root):
    """One dict per tenant: name, title, version, bytes, entries (None where it counts none)."""
    return [_describe(root, t) for t in TENANTS]


def clear_cache(root, *, encoder=None, tenants=None):
    """Empty the cache -> one dict per tenant emptied, as :func:`tenants_info` described it before.

    ``encoder``: only the feature spaces of that encoder (``[{"name": "features", "entries": n}]``);
    ``tenants``: only those tenants (names); neither: every tenant.
    """
    root = Path(root)
    if encoder is not None:
        return [{"name": "features", "title": "feature spaces", "entries": remove_spaces(root, encoder)}]
    emptied = []
    for t in TENANTS:
        if tenants is None or t.name in tenants:
            emptied.append(_describe(root, t))
            for relative in t.paths:
                shutil.rmtree(root / relative, ignore_errors=True)
    return emptied
