"""``mmcore shard CSV --out DIR --size 1GB``: WebDataset tar shards from a split CSV.

Each CSV row becomes one sample keyed by its position (``000000042``): ``KEY.<ext>`` (the
image's bytes, unchanged; the extension from its format), ``KEY.cls`` (``1``/``0``, when the
CSV has labels), ``KEY.txt`` (the text) and ``KEY.json`` (the CSV row and path, to trace a
sample back). Shards are ``DIR/<csv stem>-000000.tar``, ... of at most ``--size`` bytes each
(one sample larger than that gets a shard of its own), in CSV order.

The writing is

- **atomic**: a shard is written under a temporary name, fsynced, verified and renamed; the
  manifest ``DIR/<csv stem>.shards.json`` is replaced after each shard;
- **verified**: each written shard is read back and every sample's image sha1 compared with
  the source file's (read before writing), so a file changed or a disk error in between is
  found, and the manifest records each shard's size and sha1;
- **resumable**: run again after an interruption, the shards of the manifest are checked
  (size and sha1) and the writing goes on after the last sound one; the shard boundaries are
  a function of the CSV and ``--size`` only, so the result is the one an uninterrupted run gives.

Images are scanned like a run's header scan first; any bad image stops before writing, with
one line per row. An image file larger than ``--max-image-bytes`` (``data.max_image_bytes``,
default 50 MB) is one of them, refused from its ``stat`` without being read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

from mmcore.data.checks import scan_images
from mmcore.data.csvs import read_split
from mmcore.data.images import DEFAULT_FORMATS, DEFAULT_MAX_IMAGE_BYTES, BadImageError, read_image_bytes
from mmcore.data.memo import FileFacts
from mmcore.errors import DataError, RunError, os_error_line
from mmcore.io import file_sha1_hex

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}
_BLOCK = 512


def parse_size(text):
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 512 * 2**20, ``"4096"`` -> 4096; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 1GB, 500MB, 2GiB)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return size


def _member_bytes(size):
    """Bytes a member of ``size`` takes in a tar: its header block and its data padded to blocks."""
    return _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _sample_members(split, index, position, fact, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """(name, bytes) of one sample's members, the image read from its file (at most ``max_image_bytes``)."""
    key = f"{position:09d}"
    path = split.paths[index]
    try:
        data = read_image_bytes(path, max_image_bytes)
    except BadImageError as exc:
        raise DataError(f"{split.csv}: row {split.rows[index]}: {path}: {exc}") from None
    if hashlib.sha1(data).digest() != fact.sha1:
        raise DataError(f"{split.csv}: row {split.rows[index]}: {path}: changed while the shards were written")
    ext = _EXTENSIONS.get(fact.format, Path(path).suffix.lstrip(".").lower() or "jpg")
    members = [(f"{key}.{ext}", data)]
    if split.labels is not None:
        members.append((f"{key}.cls", str(split.labels[index]).encode()))
    members.append((f"{key}.txt", split.texts[index].encode("utf-8")))
    members.append((f"{key}.json", _json_member(split, index)))
    return members


def _json_member(split, index):
    return json.dumps({"row": split.rows[index], "path": split.raw_paths[index]}).encode()


def _tar_bytes(content):
    """A tar's size for ``content`` bytes of members: two end blocks, padded to tarfile's 20-block records."""
    record = tarfile.RECORDSIZE
    return (content + 2 * _BLOCK + record - 1) // record * record


def _plan(split, sizes, max_bytes):
    """Shard boundaries: ``[(first position, count), ...]`` from the member sizes alone (deterministic)."""
    shards, first, used = [], 0, 0
    for position, size in enumerate(sizes):
        need = _member_bytes(size) + _member_bytes(len(split.texts[position].encode("utf-8")))
        need += _member_bytes(len(_json_member(split, position)))
        need += _member_bytes(1) if split.labels is not None else 0
        if used and _tar_bytes(used + need) > max_bytes:
            shards.append((first, position - first))
            first, used = position, 0
        used += need
    if first < len(sizes):
        shards.append((first, len(sizes) - first))
    return shards


def _write_tar(path, samples):
    """Write ``samples`` (lists of (name, bytes)) as a reproducible uncompressed tar, fsynced."""
    with open(path, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for members in samples:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        handle.flush()
        os.fsync(handle.fileno())


def _verify_tar(path, samples):
    """Read a written shard back: the same members, the same bytes (sha1) -> a problem or None."""
    expected = [(name, hashlib.sha1(data).digest()) for members in samples for name, data in members]
    found = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                found.append((member.name, hashlib.sha1(tar.extractfile(member).read()).digest()))
    except (tarfile.TarError, OSError) as exc:
        return f"unreadable after writing ({exc})"
    if found != expected:
        return "what was read back differs from what was written"
    return None


def write_shards(csv, out_dir, *, max_bytes, base_dir=None, formats=DEFAULT_FORMATS, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES,
                 echo=print):
    """Write (or finish writing) the shards of ``csv`` into ``out_dir`` -> the manifest dict.

    ``manifest["pattern"]`` is the brace pattern to put in ``data.train`` (etc.) of a recipe
    with ``data.format = "webdataset"``. ``max_bytes``: the largest shard; ``max_image_bytes``:
    the largest image file (a larger one is a row problem, never read).
    """
    from mmcore.io import write_json

    csv, out_dir = Path(csv), Path(out_dir)
    split = read_split(csv, base_dir or csv.parent, require_label=False, require_text=False, max_image_bytes=max_image_bytes)
    facts_of = FileFacts(None, formats)
    bad = scan_images(split, formats=formats, facts=facts_of)
    if bad:
        raise DataError(bad + ["fix or remove these rows, then run mmcore shard again"])
    facts = facts_of(split.paths)
    plan = _plan(split, [os.path.getsize(p) for p in split.paths], max_bytes)
    csv_sha1 = file_sha1_hex(csv)
    manifest_path = out_dir / f"{csv.stem}.shards.json"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(os_error_line(out_dir, exc, what="shard directory")) from None
    done = _resume(manifest_path, out_dir, csv_sha1, max_bytes, plan, echo)
    manifest = {"csv": str(csv), "csv_sha1": csv_sha1, "max_bytes": max_bytes, "rows": len(split), "shards": done}
    for number, (first, count) in enumerate(plan):
        if number < len(done):
            continue
        name = f"{csv.stem}-{number:06d}.tar"
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        try:
            samples = [_sample_members(split, i, i, facts[i], max_image_bytes) for i in range(first, first + count)]
            _write_tar(tmp, samples)
            problem = _verify_tar(tmp, samples)
            if problem is not None:
                raise RunError(f"{out_dir / name}: {problem}; nothing was kept of this shard")
            entry = {"name": name, "first": first, "count": count, "bytes": tmp.stat().st_size, "sha1": file_sha1_hex(tmp)}
            os.replace(tmp, out_dir / name)
        except OSError as exc:
            raise RunError(os_error_line(out_dir / name, exc, what="shard") + f"; {number} shards are complete, "
                           "run mmcore shard again to go on") from None
        finally:
            if tmp.exists():
                tmp.unlink()
        done.append(entry)
        write_json(manifest_path, {**manifest, "complete": len(done) == len(plan)})
        echo(f"wrote {out_dir / name}: {count} samples, {entry['bytes']} bytes")
    last = len(plan) - 1
    manifest.update(complete=True, pattern=str(out_dir / f"{csv.stem}-{{{0:06d}..{last:06d}}}.tar"))
    write_json(manifest_path, manifest)
    return manifest


def _resume(manifest_path, out_dir, csv_sha1, max_bytes, plan, echo):
    """The sound shards an earlier run of the same CSV and size left (each checked), in order."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        echo(f"{manifest_path}: unreadable; writing every shard again")
        return []
    if manifest.get("csv_sha1") != csv_sha1 or manifest.get("max_bytes") != max_bytes:
        raise DataError(
            f"{manifest_path}: these shards were written from another CSV or --size; use another --out or remove them"
        )
    kept = []
    for number, entry in enumerate(manifest.get("shards", [])):
        path = out_dir / entry.get("name", "")
        planned = plan[number] if number < len(plan) else None
        try:
            sound = (
                planned == (entry["first"], entry["count"])
                and path.stat().st_size == entry["bytes"]
                and file_sha1_hex(path) == entry["sha1"]
            )
        except (OSError, KeyError):
            sound = False
        if not sound:
            echo(f"{path}: missing or changed; writing it again")
            break
        kept.append(entry)
    if kept:
        echo(f"resuming: {len(kept)} of {len(plan)} shards already written and verified")
    return kept
