"""The reference profile: what ``mmcore drift`` compares new ads against, kept by a run and its bundle.

It holds summaries of the held-out rows a run scored (val + test: the model never fitted them,
so their scores are what new ads of the same kind would get; a training row's score is
memorised) and a bounded, seeded sample of their rows, so drift works in production without
the training images. A folder, no pickle, bounded in size:

```
reference_profile/
  profile.json           format, version, rows, threshold, score_buckets (SCORE_BUCKETS),
                         score_counts, positives, empty_ocr, slices, sample {rows, seed, modalities}
  scores.npy             float32 [k]: the calibrated scores of the k sampled rows (k <= 2,000)
  embeddings_<m>.npy     float16 [k, dims]: the pooled features of modality <m> (image, text) of those rows
```

``score_counts[i]`` counts the rows with ``SCORE_BUCKETS[i-1] < score <= SCORE_BUCKETS[i]`` (the
Prometheus ``le`` buckets of ``mmcore serve``'s ``mmcore_calibrated_score``; the first bucket
starts at 0). ``slices`` maps each slice family of :func:`mmcore.evaluation.explain.slice_keys` to
``{slice: {"rows", "positives", "score_counts"}}``. File names derive from the modality names,
which must match ``[a-z][a-z0-9_]{0,31}``; nothing in the JSON names a path.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import attrs
import numpy as np

from mmcore.errors import RunError, not_regular_line, os_error_line
from mmcore.evaluation.explain import slice_keys
from mmcore.evaluation.metrics import SCORE_BUCKETS
from mmcore.io import atomic_open, write_json

PROFILE_DIR = "reference_profile"
PROFILE_FILE = "profile.json"
PROFILE_FORMAT = "mmcore-reference-profile"
PROFILE_VERSION = 1
#: rows sampled for the score sample (KS) and the embeddings (domain classifier)
SAMPLE_ROWS = 2000
MAX_JSON_BYTES = 1 << 20
MAX_ARRAY_BYTES = 64 << 20  # 2,000 rows x 16,384 float16 dims
MAX_DIMS = 16384
MODALITY_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


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


SCORES_FILE = "scores.npy"


def embeddings_file(modality):
    """The file of one modality's sampled embeddings."""
    return f"embeddings_{modality}.npy"


def profile_files(profile):
    """Every file name a profile folder holds (``profile.json`` last: it is written last)."""
    return [SCORES_FILE, *(embeddings_file(m) for m in profile.embeddings), PROFILE_FILE]


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


def write_profile(folder, profile):
    """Write ``profile`` into ``folder`` (the arrays first, ``profile.json`` last) and return the folder."""
    folder = Path(folder)
    arrays = {SCORES_FILE: profile.sample_scores.astype(np.float32)}
    arrays.update({embeddings_file(m): e.astype(np.float16) for m, e in profile.embeddings.items()})
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        with atomic_open(folder / name, "wb") as handle:
            handle.write(buffer.getbuffer())
    write_json(folder / PROFILE_FILE, {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "rows": profile.rows, "threshold": profile.threshold,
        "score": "calibrated_score", "score_buckets": list(SCORE_BUCKETS), "score_counts": list(profile.score_counts),
        "positives": profile.positives, "empty_ocr": profile.empty_ocr, "slices": profile.slices,
        "sample": {"rows": int(profile.sample_scores.size), "seed": profile.sample_seed,
                   "modalities": {m: int(e.shape[1]) for m, e in profile.embeddings.items()}},
    })
    return folder


class _Reader:
    """Checks one profile.json field by field; every problem is one RunError line naming the file and key."""

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


def read_profile(folder):
    """The :class:`ReferenceProfile` in ``folder``, checked; a damaged one is one RunError line."""
    folder = Path(folder)
    path = folder / PROFILE_FILE
    data = _load_json(path)
    r = _Reader(path)
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
    if not isinstance(modalities, dict):
        r.fail("sample.modalities", "must map modality names to their dimensions")
    embeddings = {}
    for modality in modalities:
        if not isinstance(modality, str) or not MODALITY_NAME.fullmatch(modality):
            r.fail("sample.modalities", f"modality name {modality!r} must match {MODALITY_NAME.pattern}")
        dims = r.count(modalities, modality, f"sample.modalities.{modality}", MAX_DIMS)
        embeddings[modality] = _load_array(folder / embeddings_file(modality), np.float16, (k, dims))
    return ReferenceProfile(
        rows=rows, threshold=float(threshold), score_counts=r.counts(data, "score_counts", "score_counts", rows),
        positives=r.count(data, "positives", "positives", rows), empty_ocr=r.count(data, "empty_ocr", "empty_ocr", rows),
        slices=slices, sample_seed=r.count(sample, "seed", "sample.seed"),
        sample_scores=_load_array(folder / SCORES_FILE, np.float32, (k,), unit_interval=True), embeddings=embeddings,
    )


def _load_json(path):
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise RunError(not_regular_line(path, what="reference profile"))
        if size > MAX_JSON_BYTES:
            raise RunError(f"{path}: {size} bytes, more than a reference profile's {MAX_JSON_BYTES}")
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RunError(f"{path}: no reference profile here; mmcore run writes one when it ends and mmcore export"
                       " copies it into the bundle") from None
    except OSError as exc:
        raise RunError(os_error_line(path, exc, what="reference profile")) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None


def _load_array(path, dtype, shape, unit_interval=False):
    """A ``.npy`` of ``dtype`` and ``shape`` (no pickle, at most MAX_ARRAY_BYTES), finite values."""
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
        raise RunError(f"{path}: expected {np.dtype(dtype).name} of shape {shape}, got {array.dtype.name} of shape {array.shape}")
    if not np.all(np.isfinite(array)) or (unit_interval and array.size and not (0 <= array.min() and array.max() <= 1)):
        raise RunError(f"{path}: holds values that are not finite" + (" scores in [0, 1]" if unit_interval else ""))
    return array

