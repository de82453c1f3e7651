"""``OUT.parts/``: the chunks of a ``predict --nproc`` job kept until its output is written
(:mod:`mmcore.commands.predict_ranks` deals them to the ranks).

- ``chunk-000012.npz``: one finished chunk (its rows' positions, logits and the lines of rows skipped
  as unreadable), written atomically (:mod:`mmcore.io`), read back checked and bounded;
- ``predict.json``: what the chunks are the scores of (:func:`manifest`); chunks of another predict
  are refused in one line (:func:`check_manifest`), never mixed in;
- ``OUT.parts.lock`` beside it: one job per output (:func:`only_job`).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import attrs
import numpy as np

from mmcore.bounded import FileRules, read_regular_file
from mmcore.errors import MmcoreError, RunError
from mmcore.io import atomic_open, file_sha1

#: what says which predict the chunks in OUT.parts/ belong to
MANIFEST = "predict.json"
MANIFEST_FORMAT = 1
_CHUNK = re.compile(r"^chunk-([0-9]{6,})\.npz$")
_MANIFEST_FILE = FileRules("file", "a predict.json", 1 << 16, "it is not one mmcore wrote")


@attrs.frozen
class ChunkPlan:
    """An input's rows cut into chunks of ``chunk_rows`` (the last may be shorter)."""

    rows: int
    chunk_rows: int

    @property
    def count(self):
        return -(-self.rows // self.chunk_rows)

    def span(self, index):
        """``range`` of the positions chunk ``index`` holds."""
        return range(index * self.chunk_rows, min(self.rows, (index + 1) * self.chunk_rows))


def parts_folder(output):
    """Where the finished chunks of ``output`` are kept until it is written: ``OUT.parts/``."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


def lock_file(output):
    """The lock rank 0 holds while it works on ``output``: ``OUT.parts.lock`` (one job per output)."""
    parts = parts_folder(output)
    return parts.with_name(parts.name + ".lock")


def chunk_file(parts, index):
    """Where chunk ``index`` is kept."""
    return Path(parts) / f"chunk-{index:06d}.npz"


@contextlib.contextmanager
def only_job(output):
    """Hold :func:`lock_file` for the block; another live job holding it is one line (:class:`~mmcore.store.locks.LockBusy`)."""
    from mmcore.store.locks import FileLock

    lock = FileLock(lock_file(output))
    try:
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(wait=False)
    except OSError as exc:
        raise RunError(f"{lock.path}: cannot take the lock ({exc.strerror or exc}); give -o a folder you can write") from None
    try:
        yield lock
    finally:
        lock.release()


def manifest(source, scorer, input_table, rows, *, chunk_rows, batch_size, base_dir):
    """What the chunks are the scores of: the model (``scorer`` None: not known yet, as in the launcher),
    the input and the options that change a score."""
    digest = file_sha1(input_table)
    return {
        "format": MANIFEST_FORMAT,
        "source": str(Path(source).resolve()),
        "model_version": scorer.model_version if scorer is not None else None,
        "input": str(Path(input_table).resolve()),
        "input_sha1": digest.hex() if digest else None,
        "rows": rows,
        "chunk_rows": int(chunk_rows),
        "batch_size": int(batch_size) if batch_size else None,  # None: the model's own
        "base_dir": str(Path(base_dir).resolve()) if base_dir else None,
    }


def check_manifest(parts, expected, *, skip=()):
    """True when ``parts`` holds chunks of the same predict as ``expected``; False when there is none.
    Another predict's folder is one line: which key differs, what to do."""
    path = Path(parts) / MANIFEST
    if not Path(parts).exists():
        return False
    if not path.is_file():
        raise MmcoreError(f"{parts}: a folder without {MANIFEST} is in the way of the chunks of -o; remove it, "
                          f"or give -o another file")
    try:
        found = json.loads(read_regular_file(path, _MANIFEST_FILE, error=RunError))
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise MmcoreError(f"{path}: not a {MANIFEST} mmcore wrote; remove {parts} to start over")
    for key, value in expected.items():
        if key not in skip and found.get(key) != value:
            raise MmcoreError(f"{parts}: holds the chunks of another predict ({key} was {found.get(key)!r}, now "
                              f"{value!r}); remove that folder to start over, or give -o another file")
    return True


def finished_chunks(parts, plan):
    """The indices of the chunk files in ``parts`` (files of a killed writer, ``.*.tmp``, are not chunks)."""
    found = set()
    for path in Path(parts).iterdir():
        match = _CHUNK.match(path.name)
        if match and int(match[1]) < plan.count:
            found.add(int(match[1]))
    return found


def write_chunk(parts, index, positions, logits, bad):
    buffer = io.BytesIO()
    np.savez(buffer, positions=np.asarray(positions, dtype=np.int64), logits=np.asarray(logits, dtype=np.float64),
             bad=np.asarray(list(bad), dtype=str))
    with atomic_open(chunk_file(parts, index), "wb") as handle:
        handle.write(buffer.getbuffer())


def read_chunks(parts, plan):
    """Every chunk's positions, logits and unreadable rows' lines, in input order; each file checked."""
    positions, logits, bad = [], [], []
    for index in range(plan.count):
        chunk_positions, chunk_logits, chunk_bad = _read_chunk(chunk_file(parts, index), plan.span(index), parts)
        positions.append(chunk_positions)
        logits.append(chunk_logits)
        bad.extend(chunk_bad)
    return np.concatenate(positions), np.concatenate(logits), bad


def _read_chunk(path, span, parts):
    rules = FileRules("chunk", "a chunk file", len(span) * 4096 + (1 << 20), "it is not one mmcore wrote")
    try:
        with np.load(io.BytesIO(read_regular_file(path, rules, error=RunError)), allow_pickle=False) as data:
            positions, logits, bad = data["positions"], data["logits"], data["bad"]
    except (ValueError, KeyError, OSError) as exc:
        raise RunError(f"{path}: not a chunk mmcore wrote ({exc}); remove {parts} to start over") from None
    fits = (positions.dtype == np.int64 and logits.dtype == np.float64 and positions.ndim == logits.ndim == 1
            and len(positions) == len(logits) and bad.ndim == 1 and bad.dtype.kind == "U"
            and bool(np.all((positions >= span.start) & (positions < span.stop)))
            and bool(np.all(np.diff(positions) > 0)))
    if not fits:
        raise RunError(f"{path}: not the scores of rows {span.start + 1}-{span.stop} (its arrays do not match); "
                       f"remove {parts} to start over")
    return positions, logits, [str(line) for line in bad]
