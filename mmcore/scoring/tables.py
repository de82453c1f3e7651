"""The table a scoring command reads (validated rows plus its own columns, kept to be written back)
and the one it writes: the input with ``score``, ``calibrated_score`` and ``prediction`` added.

A table is a CSV, or Parquet when its name ends in ``.parquet`` or ``.pq`` (read and written with
pyarrow, the ``parquet`` extra). A Parquet input is bounded like a CSV: a regular file of at most
:data:`~mmcore.data.csvs.MAX_CSV_BYTES` on disk, and at most as much again uncompressed and decoded
(:func:`read_parquet_table`). Its columns keep their types in a Parquet output; the
scores are float64 and ``prediction`` a boolean there (null where a row was not scored), and text
in a CSV as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcore.bounded import FileRules, format_bytes, read_regular_file
from mmcore.data.csvs import MAX_CSV_BYTES, REQUIRED_COLUMNS, missing_column_problems, read_table, split_from_table
from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.errors import DataError
from mmcore.io import atomic_open

OUTPUT_COLUMNS = ("score", "calibrated_score", "prediction")
#: file names read and written as Parquet (anything else is a CSV)
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_FILE = FileRules("file", "a Parquet file", MAX_CSV_BYTES, "split it into several files")
#: rows of one Parquet input (a CSV of MAX_CSV_BYTES holds a few million rows of ad text)
MAX_PARQUET_ROWS = 50_000_000


def is_parquet(path):
    """Whether ``path`` names a Parquet table (by its suffix)."""
    return Path(path).suffix.lower() in PARQUET_SUFFIXES


def input_rules(recipe_data):
    """How a model's recipe (plain data) reads rows: ``require_text``, ``check_images`` and
    ``max_image_bytes`` for :func:`read_input` (text is optional for a vision-only model, images
    for a text-only one)."""
    modality = (recipe_data.get("train") or {}).get("modality", "multimodal")
    return {
        "require_text": modality != "vision_only",
        "check_images": modality != "text_only",
        "max_image_bytes": (recipe_data.get("data") or {}).get("max_image_bytes") or DEFAULT_MAX_IMAGE_BYTES,
    }


def read_input(input_csv, base_dir=None, *, require_text=True, check_images=True, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """The table to score, read once: ``(frame, split)`` — its columns as given, to be written back
    out with the scores, and the validated :class:`~mmcore.data.split.Split` to score."""
    required, optional = _columns(require_text)
    if is_parquet(input_csv):
        frame = read_parquet_table(input_csv, required=required)
    else:
        frame = read_table(input_csv, required=required, optional=optional)
    split = split_from_table(_as_text(frame), input_csv, base_dir, require_label=False, check_images=check_images,
                             max_image_bytes=max_image_bytes)
    return frame, split


def rows_from_frame(frame, where, base_dir=None, *, require_text=True, check_images=False,
                    max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """A frame already in memory (a batch of a Ray or Spark job) -> its validated
    :class:`~mmcore.data.split.Split`; ``where`` names it in messages (rows numbered from 1)."""
    required, _ = _columns(require_text)
    missing = [name for name in required if name not in frame.columns]
    if missing:
        raise DataError(missing_column_problems(where, missing, list(map(str, frame.columns)), REQUIRED_COLUMNS))
    return split_from_table(_as_text(frame), Path(where), base_dir, require_label=False, check_images=check_images,
                            max_image_bytes=max_image_bytes)


def read_parquet_table(path, *, required=()):
    """A Parquet file as a frame (its columns' own types), bounded before its columns are decoded.

    Bounds: the file as a CSV's (a regular file of at most :data:`~mmcore.data.csvs.MAX_CSV_BYTES`),
    its rows (:data:`MAX_PARQUET_ROWS`, from its metadata), its pages uncompressed (the metadata
    again) and its text once decoded (a dictionary-encoded column can repeat one long value on every
    row: measured before it is expanded), each at most ``MAX_CSV_BYTES``. Every problem is one
    :class:`DataError` line naming the file.
    """
    from mmcore.kit.deps import require

    pa = require("pyarrow", f"reading {path}")
    import pyarrow.parquet as pq

    data = read_regular_file(path, PARQUET_FILE, error=DataError)
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        meta = parquet.metadata
        if meta.num_rows > MAX_PARQUET_ROWS:
            raise DataError(f"{path}: {meta.num_rows} rows, more than {MAX_PARQUET_ROWS}; split it into several files")
        _check_size(path, sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)), "uncompressed")
        schema = parquet.schema_arrow
        texts = [field.name for field in schema if _is_text(pa, field.type)]
        # text kept dictionary-encoded until measured
        table = pq.ParquetFile(pa.BufferReader(data), read_dictionary=texts).read()
        _check_size(path, sum(_decoded_bytes(pa, column) for column in table.columns), "decoded")
        frame = table.cast(schema).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"{path}: not a Parquet file pyarrow can read ({reason})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [name for name in required if name not in frame.columns]
    if missing:
        raise DataError(missing_column_problems(path, missing, list(frame.columns), REQUIRED_COLUMNS))
    return frame


def _check_size(path, size, how):
    if size > MAX_CSV_BYTES:
        raise DataError(f"{path}: its columns take {format_bytes(size)} {how}, more than {format_bytes(MAX_CSV_BYTES)}; "
                        f"split it into several files")


def _is_text(pa, kind):
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or \
        pa.types.is_large_binary(kind)


def _decoded_bytes(pa, column):
    """The bytes a column takes once its dictionaries are expanded (each row's value counted)."""
    import pyarrow.compute as pc

    total = 0
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            lengths = pc.binary_length(chunk.dictionary)
            total += (pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0) + 8 * len(chunk)
        else:
            total += chunk.nbytes
    return total


def _columns(require_text):
    needed = {"local_image_path": True, "label": False, "text_info": require_text}
    return [c for c in REQUIRED_COLUMNS if needed[c]], [c for c in REQUIRED_COLUMNS if not needed[c]]


def _as_text(frame):
    """The columns a Split is made of, as the strings a CSV holds (a null is an empty cell)."""
    import pandas as pd

    return pd.DataFrame({
        name: ["" if _is_null(value) else str(value) for value in frame[name].tolist()]
        for name in REQUIRED_COLUMNS if name in frame.columns
    })


def _is_null(value):
    """A missing cell: None, NaN, pandas' NA (a Parquet null read into a frame)."""
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def with_scores(frame, rows, raw, calibrated, predicted, *, as_text=False):
    """``frame`` with ``score``, ``calibrated_score`` and ``prediction`` added (a copy).

    ``rows`` are the frame's rows (numbered from 1) that were scored, in the order of the scores;
    a row left out (an unreadable image, skipped) keeps those columns empty: null (nullable
    ``Float64``/``boolean`` columns), or an empty string with ``as_text`` (the CSV's cells:
    ``repr`` of the float, ``True``/``False``).
    """
    import pandas as pd

    where = np.asarray(rows, dtype=np.int64) - 1
    out = frame.copy()
    if as_text:
        columns = {name: np.full(len(frame), "", dtype=object) for name in OUTPUT_COLUMNS}
        columns["score"][where] = [repr(float(v)) for v in raw]
        columns["calibrated_score"][where] = [repr(float(v)) for v in calibrated]
        columns["prediction"][where] = [str(bool(v)) for v in predicted]
        for name in OUTPUT_COLUMNS:
            out[name] = columns[name]
        return out
    unscored = np.ones(len(frame), dtype=bool)
    unscored[where] = False
    scores = {"score": raw, "calibrated_score": calibrated}
    for name, values in scores.items():
        column = np.zeros(len(frame), dtype=np.float64)
        column[where] = values
        out[name] = pd.arrays.FloatingArray(column, unscored.copy())
    column = np.zeros(len(frame), dtype=bool)
    column[where] = np.asarray(predicted, dtype=bool)
    out["prediction"] = pd.arrays.BooleanArray(column, unscored.copy())
    return out


def write_scored_table(output, frame, rows, raw, calibrated, predicted):
    """``frame`` with the scores (:func:`with_scores`) written atomically: Parquet when ``output``
    is named so (:func:`is_parquet`), else a CSV (:func:`write_scored_csv`)."""
    if not is_parquet(output):
        return write_scored_csv(output, frame, rows, raw, calibrated, predicted)
    from mmcore.kit.deps import require

    pa = require("pyarrow", f"writing {output}")
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(with_scores(frame, rows, raw, calibrated, predicted), preserve_index=False)
    # pandas keeps text as Arrow's large_string: written back as the string type a Parquet input had
    table = table.cast(pa.schema([field.with_type(pa.string()) if field.type == pa.large_string() else field
                                  for field in table.schema], metadata=table.schema.metadata))
    with atomic_open(output, "wb") as handle:
        pq.write_table(table, handle)


def write_scored_csv(output, frame, rows, raw, calibrated, predicted):
    """``frame`` (the input table) with score, calibrated_score and prediction, written atomically
    as a CSV (see :func:`with_scores`, ``as_text``)."""
    out = with_scores(frame, rows, raw, calibrated, predicted, as_text=True)
    with atomic_open(output, "w", encoding="utf-8", newline="") as handle:
        out.to_csv(handle, index=False)
