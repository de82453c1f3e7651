"""The reference profile: what ``mmcore drift`` compares new ads against, kept by a run and its bundle.

It holds summaries of the held-out rows a run scored (val + test: the model never fitted them,
so their scores are what new ads of the same kind would get; a training row's score is
memorised) and a bounded, seeded sample of their rows, so drift works in production without
the training images. One safetensors file (a JSON header and raw little-endian arrays: no code,
no pickle), bounded in size:

```
reference_profile.safetensors
  __metadata__["reference_profile"]  the summary as a JSON string: format, version, rows, threshold,
                                     score_buckets (SCORE_BUCKETS), score_counts, positives, empty_ocr,
                                     slices, sample {rows, seed, modalities}
  scores                float32 [k]: the calibrated scores of the k sampled rows (k <= 2,000)
  embeddings_<m>        float16 [k, dims]: the pooled features of modality <m> (image, text) of those rows
```

``score_counts[i]`` counts the rows with ``SCORE_BUCKETS[i-1] < score <= SCORE_BUCKETS[i]`` (the
Prometheus ``le`` buckets of ``mmcore serve``'s ``mmcore_calibrated_score``; the first bucket
starts at 0). ``slices`` maps each slice family of :func:`mmcore.evaluation.explain.slice_keys` to
``{slice: {"rows", "positives", "score_counts"}}``. Tensor names derive from the modality names,
which must match ``[a-z][a-z0-9_]{0,31}``; nothing in the summary names a path.

Runs and bundles written before the one file kept the same summary and arrays in a folder,
``reference_profile/`` (``profile.json``, ``scores.npy``, ``embeddings_<m>.npy``); :func:`read_profile`
still reads it, with the same checks, and :func:`profile_path` finds whichever a directory holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs
import numpy as np

from mmcore.errors import RunError, not_regular_line, os_error_line
from mmcore.evaluation.explain import slice_keys
from mmcore.evaluation.metrics import SCORE_BUCKETS
from mmcore.io import atomic_open

#: the profile of a run directory or a bundle: one safetensors file
PROFILE_NAME = "reference_profile.safetensors"
#: the ``__metadata__`` key holding the summary (a JSON string)
METADATA_KEY = "reference_profile"
#: the folder older runs and bundles kept the profile in, and its summary file
PROFILE_DIR = "reference_profile"
PROFILE_FILE = "profile.json"
PROFILE_FORMAT = "mmcore-reference-profile"
PROFILE_VERSION = 1
#: rows sampled for the score sample (KS) and the embeddings (domain classifier)
SAMPLE_ROWS = 2000
MAX_JSON_BYTES = 1 << 20
MAX_ARRAY_BYTES = 64 << 20  # 2,000 rows x 16,384 float16 dims
MAX_DIMS = 16384
MAX_MODALITIES = 8
#: the safetensors header: the summary (escaped into a JSON string) and one entry per array
MAX_HEADER_BYTES = 2 * MAX_JSON_BYTES + (64 << 10)
MODALITY_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
SCORES = "scores"
#: safetensors dtype codes, named as numpy names them (in messages)
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_DTYPE_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
_MISSING = "no reference profile here; mmcore run writes one when it ends and mmcore export copies it into the bundle"


@attrs.frozen(kw_only=True, eq=False)
class ReferenceProfile:
    """Summaries of the held-out rows of a run (see the module docstring)."""

    rows: int
    threshold: float
    score_counts: tuple[int, ...]
    positives: int  # rows with calibrated_score >= threshold
    empty_ocr: int  # rows whose OCR text is empty
    slices: dict  # {family: {slice: {"rows", "positives", "score_counts"}}}
    sample_seed: int
    sample_scores: np.ndarray  # float32 [k]
    embeddings: dict  # {modality: float16 [k, dims]}


def embeddings_name(modality):
    """The tensor (and, in the older folder, the ``.npy`` file stem) of one modality's sampled embeddings."""
    return f"embeddings_{modality}"


def profile_path(directory):
    """Where the reference profile of a run directory or bundle is: its ``reference_profile.safetensors``,
    or the ``reference_profile/`` folder of one written before that file (when only the folder is there)."""
    directory = Path(directory)
    folder = directory / PROFILE_DIR
    if not (directory / PROFILE_NAME).exists() and (folder / PROFILE_FILE).exists():
        return folder
    return directory / PROFILE_NAME


def folder_files(profile):
    """Every file name an older ``reference_profile/`` folder holds for ``profile``."""
    return [f"{SCORES}.npy", *(f"{embeddings_name(m)}.npy" for m in profile.embeddings), PROFILE_FILE]


def score_histogram(scores, edges=SCORE_BUCKETS):
    """Counts of ``scores`` in the buckets ``(edges[i-1], edges[i]]`` (the first from 0): the
    differences of a Prometheus histogram's cumulative ``le`` counts on the same edges."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.bincount(np.searchsorted(np.asarray(edges), scores, side="left"), minlength=len(edges))[: len(edges)]


def slice_summary(scores, threshold, keys):
    """``{family: {slice: {"rows", "positives", "score_counts"}}}`` of scored rows; ``keys`` from
    :func:`mmcore.evaluation.explain.slice_keys`."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = {}
    for family, names in keys.items():
        names = np.asarray(names, dtype=object)
        out[family] = {}
        for name in sorted(set(names.tolist())):
            members = scores[names == name]
            out[family][name] = {"rows": int(members.size), "positives": int(np.sum(members >= threshold)),
                                 "score_counts": [int(c) for c in score_histogram(members)]}
    return out


def build_profile(scores, threshold, texts, embeddings, *, image_sizes=None, sample_rows=SAMPLE_ROWS, seed=0):
    """A :class:`ReferenceProfile` of held-out rows: their calibrated ``scores``, the run's
    ``threshold``, their OCR ``texts``, ``embeddings`` ``{modality: rows x dims}`` and, optionally,
    their ``image_sizes`` (``(width, height)`` or None each). At most ``sample_rows`` rows
    (chosen with ``seed``) keep their score and embeddings."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    texts = list(texts)
    n = scores.size
    if n == 0 or len(texts) != n or any(len(e) != n for e in embeddings.values()):
        raise ValueError(f"a profile needs one text and one embedding row per score (scores: {n}, texts: "
                         f"{len(texts)}, embeddings: {', '.join(f'{m} {len(e)}' for m, e in embeddings.items())})")
    if len(embeddings) > MAX_MODALITIES:
        raise ValueError(f"a profile keeps at most {MAX_MODALITIES} modalities (got {len(embeddings)})")
    for modality in embeddings:
        if not MODALITY_NAME.fullmatch(modality):
            raise ValueError(f"modality name {modality!r} must match {MODALITY_NAME.pattern}")
    keys = slice_keys(texts, image_sizes)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, int(sample_rows)), replace=False))
    return ReferenceProfile(
        rows=n, threshold=float(threshold), score_counts=tuple(int(c) for c in score_histogram(scores)),
        positives=int(np.sum(scores >= threshold)), empty_ocr=keys["text"].count("text empty"),
        slices=slice_summary(scores, threshold, keys), sample_seed=int(seed),
        sample_scores=scores[sample].astype(np.float32),
        embeddings={m: np.asarray(e[sample], dtype=np.float16) for m, e in embeddings.items()},
    )


def profile_summary(profile):
    """The JSON summary of ``profile`` (everything but its arrays, which it describes: see the module docstring)."""
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "rows": profile.rows, "threshold": profile.threshold,
        "score": "calibrated_score", "score_buckets": list(SCORE_BUCKETS), "score_counts": list(profile.score_counts),
        "positives": profile.positives, "empty_ocr": profile.empty_ocr, "slices": profile.slices,
        "sample": {"rows": int(profile.sample_scores.size), "seed": profile.sample_seed,
                   "modalities": {m: int(e.shape[1]) for m, e in profile.embeddings.items()}},
    }


def write_profile(path, profile):
    """Write ``profile`` as one safetensors file at ``path`` (atomically) and return the path."""
    from safetensors.numpy import save

    tensors = {SCORES: np.ascontiguousarray(profile.sample_scores, dtype=np.float32)}
    tensors.update({embeddings_name(m): np.ascontiguousarray(e, dtype=np.float16) for m, e in profile.embeddings.items()})
    summary = json.dumps(profile_summary(profile), ensure_ascii=False, allow_nan=False)
    data = save(tensors, metadata={METADATA_KEY: summary})
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


class _Reader:
    """Checks a profile's summary field by field; every problem is one RunError line naming the file and key."""

    def __init__(self, path):
        self.path = path

    def fail(self, key, message):
        raise RunError(f"{self.path}: {key}: {message}")

    def get(self, data, key, path=None):
        if not isinstance(data, dict) or key not in data:
            self.fail(path or key, "missing")
        return data[key]

    def count(self, data, key, path, upper=None):
        value = self.get(data, key, path)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (upper is not None and value > upper):
            bound = f" up to {upper}" if upper is not None else ""
            self.fail(path, f"must be a whole number from 0{bound} (got {json.dumps(value)[:40]})")
        return value

    def counts(self, data, key, path, total):
        value = self.get(data, key, path)
        if (not isinstance(value, list) or len(value) != len(SCORE_BUCKETS)
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in value)):
            self.fail(path, f"must be {len(SCORE_BUCKETS)} counts, one per score bucket")
        if sum(value) != total:
            self.fail(path, f"counts sum to {sum(value)}, not the {total} rows")
        return tuple(value)


def read_profile(path):
    """The :class:`ReferenceProfile` at ``path`` (a ``reference_profile.safetensors``, or an older
    ``reference_profile/`` folder), checked, every size bounded before it is read; a damaged one
    is one RunError line naming the file and what is wrong."""
    path = Path(path)
    older = path.is_dir() and path.suffix != ".safetensors"  # a folder named as the file is refused as not a file
    return _read_folder(path) if older else _read_file(path)


def _check_summary(data, r):
    """The checked summary: ReferenceProfile's fields but its arrays, and ``{tensor: (dtype, shape)}``
    of the arrays it declares (bounded: at most MAX_MODALITIES of at most SAMPLE_ROWS x MAX_DIMS)."""
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        r.fail("format", f"not an mmcore reference profile (expected {PROFILE_FORMAT!r})")
    if data.get("version") != PROFILE_VERSION:
        r.fail("version", f"version {json.dumps(data.get('version'))[:20]} is not the {PROFILE_VERSION} this mmcore reads")
    if r.get(data, "score_buckets") != list(SCORE_BUCKETS):
        r.fail("score_buckets", "written with other bucket edges than this mmcore's SCORE_BUCKETS; export the run again")
    rows = r.count(data, "rows", "rows")
    if rows == 0:
        r.fail("rows", "a profile of no rows")
    threshold = r.get(data, "threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        r.fail("threshold", f"must be a number between 0 and 1 (got {json.dumps(threshold)[:40]})")
    slices = r.get(data, "slices")
    if not isinstance(slices, dict) or "text" not in slices:
        r.fail("slices", "must map each slice family (at least 'text') to its slices")
    for family, members in slices.items():
        if not isinstance(members, dict) or not members:
            r.fail(f"slices.{family}", "must map slice names to their counts")
        for name, entry in members.items():
            key = f"slices.{family}.{name}"
            size = r.count(entry, "rows", f"{key}.rows", rows)
            r.count(entry, "positives", f"{key}.positives", size)
            r.counts(entry, "score_counts", f"{key}.score_counts", size)
        if sum(entry["rows"] for entry in members.values()) != rows:
            r.fail(f"slices.{family}", f"slice rows do not add up to the {rows} rows")
    sample = r.get(data, "sample")
    k = r.count(sample, "rows", "sample.rows", min(rows, SAMPLE_ROWS))
    modalities = r.get(sample, "modalities", "sample.modalities")
    if not isinstance(modalities, dict) or len(modalities) > MAX_MODALITIES:
        r.fail("sample.modalities", f"must map up to {MAX_MODALITIES} modality names to their dimensions")
    shapes = {SCORES: (np.dtype(np.float32), (k,))}
    for modality in modalities:
        if not isinstance(modality, str) or not MODALITY_NAME.fullmatch(modality):
            r.fail("sample.modalities", f"modality name {modality!r} must match {MODALITY_NAME.pattern}")
        dims = r.count(modalities, modality, f"sample.modalities.{modality}", MAX_DIMS)
        shapes[embeddings_name(modality)] = (np.dtype(np.float16), (k, dims))
    fields = {"rows": rows, "threshold": float(threshold), "score_counts": r.counts(data, "score_counts", "score_counts", rows),
              "positives": r.count(data, "positives", "positives", rows),
              "empty_ocr": r.count(data, "empty_ocr", "empty_ocr", rows),
              "slices": slices, "sample_seed": r.count(sample, "seed", "sample.seed")}
    return fields, shapes


def _profile(fields, arrays):
    """The profile of a checked summary and its checked arrays (by tensor name)."""
    embeddings = {name.removeprefix("embeddings_"): array for name, array in arrays.items() if name != SCORES}
    return ReferenceProfile(**fields, sample_scores=arrays[SCORES], embeddings=embeddings)


def _check_values(where, name, array):
    """Finite values, and scores in [0, 1]; ``where``: the line's start (the file, and the tensor in it)."""
    scores = name == SCORES
    if not np.all(np.isfinite(array)) or (scores and array.size and not (0 <= array.min() and array.max() <= 1)):
        raise RunError(f"{where}: holds values that are not finite" + (" scores in [0, 1]" if scores else ""))
    return array


def _shape_line(dtype, shape):
    return f"{dtype} of shape {tuple(shape)}"


# -- reference_profile.safetensors ---------------------------------------------------------------


def _read_file(path):
    """The one-file profile: the header's length and JSON, the summary, each tensor's declared dtype
    and shape against it, the file's size against all of them; only then the arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    r = _Reader(path)
    size = _regular_size(path, what="reference profile")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise RunError(f"{path}: {size} bytes, too short for a safetensors file")
            header_bytes = int.from_bytes(head, "little")
            if header_bytes > MAX_HEADER_BYTES:
                raise RunError(f"{path}: its header declares {header_bytes} bytes, more than a reference profile's "
                               f"{MAX_HEADER_BYTES}")
            if 8 + header_bytes > size:
                raise RunError(f"{path}: {size} bytes, shorter than its {header_bytes}-byte header (a truncated file)")
            header = _parse_json(path, handle.read(header_bytes), what="its safetensors header")
            if not isinstance(header, dict):
                r.fail("header", "must be a JSON object")
            metadata = r.get(header, "__metadata__")
            summary = r.get(metadata, METADATA_KEY, f"__metadata__.{METADATA_KEY}")
            if not isinstance(summary, str):
                r.fail(f"__metadata__.{METADATA_KEY}", "must be the summary as a JSON string")
            if len(summary) > MAX_JSON_BYTES:
                r.fail(f"__metadata__.{METADATA_KEY}", f"{len(summary)} characters, more than a summary's {MAX_JSON_BYTES}")
            fields, shapes = _check_summary(_parse_json(path, summary.encode(), what=f"__metadata__.{METADATA_KEY}"), r)
            declared = _check_tensors(r, header, shapes)
            if size != 8 + header_bytes + declared:
                raise RunError(f"{path}: {size} bytes, its header declares {8 + header_bytes + declared} "
                               "(a truncated or damaged file)")
            handle.seek(0)
            raw = handle.read(size)
    except FileNotFoundError:
        raise RunError(f"{path}: {_MISSING}") from None
    except OSError as exc:
        raise RunError(os_error_line(path, exc, what="reference profile")) from None
    try:
        arrays = load(raw)
    except SafetensorError as exc:
        raise RunError(f"{path}: not a valid safetensors file ({exc})") from None
    return _profile(fields, {name: _check_values(f"{path}: tensor {name}", name, arrays[name]) for name in shapes})


def _check_tensors(r, header, shapes):
    """Each declared tensor of the dtype and shape the summary gives, none other; -> their bytes in all."""
    for name in header:
        if name != "__metadata__" and name not in shapes:
            r.fail(f"tensor {name}", "not part of a reference profile")
    total = 0
    for name, (dtype, shape) in shapes.items():
        entry = r.get(header, name, f"tensor {name}")
        got_dtype, got_shape = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else (None, None)
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if got_dtype != _DTYPE_CODES[dtype] or got_shape != list(shape):
            got = (_shape_line(_DTYPE_NAMES.get(got_dtype, got_dtype), got_shape) if isinstance(got_shape, list)
                   else json.dumps(entry)[:80])
            r.fail(f"tensor {name}", f"expected {_shape_line(dtype.name, shape)}, got {got}")
        nbytes = dtype.itemsize * int(np.prod(shape))
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or offsets[1] - offsets[0] != nbytes):
            r.fail(f"tensor {name}", f"data_offsets must span its {nbytes} bytes (got {json.dumps(offsets)[:40]})")
        total += nbytes
    return total


# -- the older reference_profile/ folder -----------------------------------------------------------


def _read_folder(folder):
    """A ``reference_profile/`` folder of an older run or bundle: ``profile.json`` and one ``.npy`` per array."""
    path = folder / PROFILE_FILE
    fields, shapes = _check_summary(_load_json(path), _Reader(path))
    arrays = {}
    for name, (dtype, shape) in shapes.items():
        npy = folder / f"{name}.npy"
        arrays[name] = _check_values(npy, name, _load_array(npy, dtype, shape))
    return _profile(fields, arrays)


def _regular_size(path, *, what):
    """The size of the regular file ``path`` (checked before it is opened: a FIFO would block)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RunError(f"{path}: {_MISSING}") from None
    except OSError as exc:
        raise RunError(os_error_line(path, exc, what=what)) from None
    if not path.is_file():
        raise RunError(not_regular_line(path, what=what))
    return size


def _parse_json(path, raw, *, what=None):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: {what + ': ' if what else ''}not valid JSON ({exc})") from None


def _load_json(path):
    size = _regular_size(path, what="reference profile")
    if size > MAX_JSON_BYTES:
        raise RunError(f"{path}: {size} bytes, more than a reference profile's {MAX_JSON_BYTES}")
    try:
        return _parse_json(path, path.read_bytes())
    except OSError as exc:
        raise RunError(os_error_line(path, exc, what="reference profile")) from None


def _load_array(path, dtype, shape):
    """A ``.npy`` of ``dtype`` and ``shape`` (no pickle, at most MAX_ARRAY_BYTES)."""
    try:
        size = path.stat().st_size
        if size > MAX_ARRAY_BYTES:
            raise RunError(f"{path}: {size} bytes, more than a profile array's {MAX_ARRAY_BYTES}")
        array = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise RunError(os_error_line(path, exc, what="reference profile")) from None
    except ValueError as exc:  # not a .npy, or an object array that would need pickle
        raise RunError(f"{path}: not a numeric .npy array ({exc})") from None
    if array.dtype != dtype or array.shape != shape:
        raise RunError(f"{path}: expected {_shape_line(np.dtype(dtype).name, shape)}, "
                       f"got {_shape_line(array.dtype.name, array.shape)}")
    return array
