"""Read and validate the split CSVs (``local_image_path,label,text_info``).

Validation happens before training starts and reports ALL problems at once, one line each,
naming the file and the row (rows are counted from 1, the header not included).
"""

from __future__ import annotations

import codecs
import os
import re
from pathlib import Path

from mmcore.bounded import FileRules, read_regular_file
from mmcore.data.bulk import paused_gc
from mmcore.data.encodings import guess_encoding
from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES, ImageSample, image_file_stat
from mmcore.data.split import Split, limited, parse_label
from mmcore.errors import DataError, closest

REQUIRED_COLUMNS = ("local_image_path", "label", "text_info")
#: a split CSV is read whole (pandas); past this, write WebDataset shards (a million rows of ad
#: text are a few hundred MB)
MAX_CSV_BYTES = 2 << 30
CSV_FILE = FileRules("file", "a CSV file", MAX_CSV_BYTES,
                     "split it, or write WebDataset shards (mmcore shard) and set data.format = \"webdataset\"")


@paused_gc()  # the per-row objects (frame cells, paths, stats) hold no cycles
def read_split(csv, base_dir=None, *, require_label=True, require_text=True, check_images=True,
               max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """Read one CSV into a :class:`Split`, or raise :class:`DataError` listing every problem.

    ``check_images``: each image path must be a regular file of at most ``max_image_bytes``
    (``data.max_image_bytes``), decided by the one ``stat`` taken per row; a larger file is a
    row problem and its bytes are never read."""
    needed = {"local_image_path": True, "label": require_label, "text_info": require_text}
    frame = read_table(
        csv,
        required=[c for c in REQUIRED_COLUMNS if needed[c]],
        optional=[c for c in REQUIRED_COLUMNS if not needed[c]],
    )
    return split_from_table(frame, csv, base_dir, require_label=require_label, check_images=check_images,
                            max_image_bytes=max_image_bytes)


@paused_gc()
def split_from_table(frame, csv, base_dir=None, *, require_label=True, check_images=True,
                     max_image_bytes=DEFAULT_MAX_IMAGE_BYTES, row_numbers=None):
    """A :class:`Split` from a frame :func:`read_table` gave (so a caller that also needs the
    frame, e.g. to write it back out with scores, reads the CSV once).

    An image cell may also hold an :class:`~mmcore.data.images.ImageSample` (an image in memory,
    bounded when it was taken in: :mod:`mmcore.data.frames`). ``row_numbers``: what messages call
    each row (default: 1, 2, ... as in the CSV file)."""
    csv = Path(csv)
    if len(frame) == 0:
        raise DataError(f"{csv}: no rows")
    base = Path(base_dir) if base_dir else csv.parent
    paths, texts, labels, rows, raw_paths, stats = [], [], [], [], [], []
    bad_labels, missing_images, empty_paths = [], [], []
    columns = {name: frame[name].tolist() for name in ("local_image_path", "label", "text_info") if name in frame.columns}
    raws, label_values, text_values = columns["local_image_path"], columns.get("label"), columns.get("text_info")
    numbers = range(1, len(raws) + 1) if row_numbers is None else row_numbers
    for position, (index, raw) in enumerate(zip(numbers, raws)):
        if isinstance(raw, ImageSample):
            path, st, raw = raw, None, str(raw)
        else:
            raw = str(raw).strip()
            if not raw:
                empty_paths.append(f"{csv}: row {index}: empty local_image_path")
                continue
            path = Path(raw) if os.path.isabs(raw) else base / raw  # one parse of the name per row
            # never raises (ENAMETOOLONG, EACCES); a file over max_image_bytes is refused here, unread
            st, problem = image_file_stat(path, max_image_bytes) if check_images else (None, None)
            if problem is not None:
                missing_images.append(f"{csv}: row {index}: {problem}: {path}")
        label = None
        if label_values is not None:
            value = label_values[position]
            label = parse_label(value)
            if label is None and (require_label or str(value).strip()):
                bad_labels.append(
                    f"{csv}: row {index}: bad label {value!r} "
                    f"(expected True/False, 1/0 or true/false)"
                )
        paths.append(path)
        raw_paths.append(raw)
        stats.append(st)
        texts.append(" ".join(str(text_values[position]).split()) if text_values is not None else "")
        labels.append(label)
        rows.append(index)
    problems = (
        limited(empty_paths, "empty paths", csv)
        + limited(bad_labels, "bad labels", csv)
        + limited(missing_images, "missing images", csv)
    )
    if problems:
        raise DataError(problems)
    keep_labels = label_values is not None and all(label is not None for label in labels)
    return Split(
        csv=csv,
        paths=tuple(paths),
        texts=tuple(texts),
        labels=tuple(labels) if keep_labels else None,
        rows=tuple(rows),
        raw_paths=tuple(raw_paths),
        stats=tuple(stats) if check_images else None,
    )


def resolve_csv(name, base_dir):
    """A split CSV named in the recipe: absolute, or relative to ``data.base_dir``."""
    path = Path(name)
    if path.is_absolute() or not base_dir:
        return path
    return Path(base_dir) / path


def load_splits(data_config, *, names=("train", "val", "test"), cache=None):
    """Validate every split named in the recipe, collecting problems from all of them.

    ``data.format = "webdataset"``: the splits are shard URLs (:mod:`mmcore.data.webdataset`;
    ``cache``, the recipe's ``[cache]``, says where shard indexes are remembered).
    """
    if getattr(data_config, "format", "csv") == "webdataset":
        from mmcore.data.webdataset import load_shard_splits

        splits = load_shard_splits(data_config, names=names, cache=cache)
    else:
        splits, problems = {}, []
        for name in names:
            csv = resolve_csv(getattr(data_config, name), data_config.base_dir)
            try:
                splits[name] = read_split(csv, data_config.base_dir or csv.parent, max_image_bytes=data_config.max_image_bytes)
            except DataError as exc:
                problems.extend(exc.problems)
        if problems:
            raise DataError(problems)
    require_both_classes(splits)
    return splits


def require_both_classes(splits):
    """The train and val splits (where given) must hold both classes: AUROC and training need them."""
    for name in ("train", "val"):
        if name in splits:
            classes = set(splits[name].labels)
            if len(classes) < 2:
                only = "True" if classes == {1} else "False"
                raise DataError(
                    f"{splits[name].csv}: {name} split has only one class ({only}); "
                    f"AUROC and training need both"
                )


# ---------------------------------------------------------------- the one CSV reader

#: delimiters a CSV saved by a spreadsheet in another locale may use instead of the comma
OTHER_DELIMITERS = {";": "';'", "\t": "a tab", "|": "'|'"}


def read_table(path, *, required=(), optional=()):
    """A comma-separated UTF-8 CSV as a frame of strings (column names stripped, every column kept).

    ``required`` columns must be present; ``optional`` ones are known but may be missing (both
    are used to hint at a renamed column or a missing header). Every problem is a
    :class:`DataError` of one line naming the file: unreadable or empty file, another encoding
    (UTF-16/32 named, a legacy code page guessed, the bad byte's offset in the file), another
    delimiter (named), a syntax error (its line), missing columns (one line each).
    """
    import io

    import pandas as pd

    path = Path(path)
    known = _known_columns(required, optional)
    text = _decode(path, _read_bytes(path), known)
    _check_delimiter(path, text, known)
    try:
        frame = pd.read_csv(io.StringIO(text), keep_default_na=False, dtype=str)
    except pd.errors.EmptyDataError:
        raise DataError(_empty(path, known)) from None
    except pd.errors.ParserError as exc:
        raise DataError(_parse_problem(path, str(exc))) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(missing_column_problems(path, missing, list(frame.columns), known))
    return frame


def _known_columns(required, optional):
    """Required and optional columns, in the order a split's header has them."""
    known = list(dict.fromkeys([*required, *optional]))
    order = {c: i for i, c in enumerate(REQUIRED_COLUMNS)}
    return sorted(known, key=lambda c: order.get(c, len(order)))


def _empty(path, known):
    return f"{path}: file is empty (expected a header: {','.join(known)})"


def _read_bytes(path):
    """The CSV's bytes: a regular file (a FIFO or a device is refused unopened) of at most ``MAX_CSV_BYTES``."""
    return read_regular_file(path, CSV_FILE, error=DataError)


# (BOM, name) longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _decode(path, data, known):
    """The file's text; any encoding but UTF-8 (with or without BOM) is one line saying which."""
    if not data.strip():
        raise DataError(_empty(path, known))
    wide = _wide_encoding(data)
    if wide is not None:
        excel = " (Excel's 'Unicode Text')" if wide == "UTF-16" else ""
        raise DataError(f"{path}: not UTF-8 text: it is {wide}{excel}; re-save it as UTF-8 (Excel: CSV UTF-8)")
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(_not_utf8(path, data, skip + exc.start, skip)) from None


def _wide_encoding(data):
    """``"UTF-16"`` / ``"UTF-32"`` when ``data`` is in one of them (BOM or not), else None.

    Without a BOM the NUL bytes give it away: the header is ASCII, so UTF-16 has a NUL in every
    other byte and UTF-32 three in every four (UTF-8 text never holds NUL).
    """
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    sample = data[:128]  # the header's first characters: ASCII in a split CSV
    sample = sample[: len(sample) - len(sample) % 4]
    if len(sample) < 8 or b"\0" not in sample:
        return None
    zero = [sample[k::4].count(0) / (len(sample) // 4) for k in range(4)]
    if (zero[2] > 0.9 and zero[3] > 0.9) or (zero[0] > 0.9 and zero[1] > 0.9):
        return "UTF-32"
    if (zero[1] > 0.5 and zero[3] > 0.5) or (zero[0] > 0.5 and zero[2] > 0.5):
        return "UTF-16"
    return None


def _not_utf8(path, data, offset, skip):
    """``offset`` counts from the start of the file (a UTF-8 BOM included). The line names the
    code page the bytes are most likely in (:func:`~mmcore.data.encodings.guess_encoding`) and
    the ``iconv`` command that converts the file."""
    line = data.count(b"\n", 0, offset) + 1
    hint = "re-save it as UTF-8"
    encoding = guess_encoding(data[skip:])
    if encoding is not None:
        converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
        hint = (f"it looks like {encoding.label}; re-save it as UTF-8 (Excel: CSV UTF-8) or convert it: "
                f"iconv -f {encoding.iconv} -t UTF-8 {path} > {converted}")
    return f"{path}: line {line}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}); {hint}"


def _check_delimiter(path, text, known):
    """Refuse, naming it, a header that splits on ';', a tab or '|' but not on commas.

    pandas would read such a file as one column and report every column missing, with a wrong
    rename hint; the header alone tells: its known column names appear only when split on the
    other delimiter (or, without a header, only that delimiter splits the first line).
    """
    header = text.split("\n", 1)[0].rstrip("\r")
    commas = _fields(header, ",")
    if any(c in commas for c in known):
        return
    for delimiter, name in OTHER_DELIMITERS.items():
        fields = _fields(header, delimiter)
        if any(c in fields for c in known) or (len(commas) == 1 and len(fields) > 1):
            raise DataError(f"{path}: the delimiter is {name}, not ','; save it as a comma-separated CSV")


def _fields(line, delimiter):
    import csv

    return [field.strip() for field in next(csv.reader([line], delimiter=delimiter), [])]


def _parse_problem(csv, message):
    message = " ".join(message.split())
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if fields:
        expected, line, saw = fields.groups()
        return (
            f"{csv}: line {line}: {saw} fields, but the header has {expected} "
            f"(put text containing commas in double quotes)"
        )
    quote = re.search(r"EOF inside string starting at row (\d+)", message)
    if quote:
        return f"{csv}: line {int(quote.group(1)) + 1}: a double quote is opened and never closed"
    return f"{csv}: cannot parse CSV ({message.removeprefix('Error tokenizing data. ')})"


def missing_column_problems(csv, missing, found, known):
    """One line per missing column; a column that looks like it (a rename) is pointed out."""
    shown = ", ".join(found) or "(none)"
    candidates = [c for c in found if c not in known]
    problems = []
    for column in missing:
        hint = ""
        match = _close_column(column, candidates)
        if match:
            hint = f"; rename {match!r} to {column!r}"
        elif not any(c in found for c in known):
            hint = f"; the first line must be the header {','.join(known)}"
        problems.append(f"{csv}: missing column {column!r} (found: {shown}){hint}")
    return problems


def _close_column(column, candidates):
    lowered = {c.lower().replace(" ", "_"): c for c in candidates}
    if column in lowered:
        return lowered[column]
    match = closest(column, list(lowered))
    return lowered[match] if match else None
