"""Read and validate the split CSVs (``local_image_path,label,text_info``).

Validation happens before training starts and reports ALL problems at once, one line each,
naming the file and the row (rows are counted from 1, the header not included).
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import numpy as np

from mmcore.data.images import image_file_problem
from mmcore.errors import DataError, closest

REQUIRED_COLUMNS = ("local_image_path", "label", "text_info")
TRUE_LABELS = {"true": 1, "1": 1, "1.0": 1}
FALSE_LABELS = {"false": 0, "0": 0, "0.0": 0}
MAX_LISTED = 10


@attrs.frozen
class Split:
    """One CSV's validated rows: resolved image paths, texts and labels (None when unlabeled)."""

    csv: Path
    paths: tuple[Path, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    rows: tuple[int, ...]
    raw_paths: tuple[str, ...]

    def __len__(self):
        return len(self.paths)

    def label_array(self):
        return np.asarray(self.labels, dtype=np.int64)

    def subset(self, keep):
        """Only the rows at positions ``keep`` (e.g. dropping bad images)."""
        keep = list(keep)
        pick = lambda seq: tuple(seq[i] for i in keep)  # noqa: E731
        return attrs.evolve(
            self,
            paths=pick(self.paths),
            texts=pick(self.texts),
            labels=pick(self.labels) if self.labels is not None else None,
            rows=pick(self.rows),
            raw_paths=pick(self.raw_paths),
        )


def parse_label(value):
    """True/False, 1/0, true/false (any case) -> 1/0, or None when it is none of these."""
    text = str(value).strip().lower()
    if text in TRUE_LABELS:
        return 1
    if text in FALSE_LABELS:
        return 0
    return None


def _limited(problems, what, csv):
    if len(problems) > MAX_LISTED:
        more = len(problems) - MAX_LISTED
        return problems[:MAX_LISTED] + [f"{csv}: ... and {more} more {what}"]
    return problems


def read_split(csv, base_dir=None, *, require_label=True, require_text=True, check_images=True):
    """Read one CSV into a :class:`Split`, or raise :class:`DataError` listing every problem."""
    csv = Path(csv)
    frame = _read_frame(csv)
    frame.columns = [str(c).strip() for c in frame.columns]
    required = ["local_image_path"]
    if require_label:
        required.append("label")
    if require_text:
        required.append("text_info")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(_missing_column_problems(csv, missing, list(frame.columns)))
    if len(frame) == 0:
        raise DataError(f"{csv}: no rows")

    base = Path(base_dir) if base_dir else csv.parent
    paths, texts, labels, rows, raw_paths = [], [], [], [], []
    bad_labels, missing_images, empty_paths = [], [], []
    has_label = "label" in frame.columns
    has_text = "text_info" in frame.columns
    for index, record in enumerate(frame.itertuples(index=False), start=1):
        record = record._asdict()
        raw = str(record["local_image_path"]).strip()
        if not raw:
            empty_paths.append(f"{csv}: row {index}: empty local_image_path")
            continue
        path = Path(raw) if Path(raw).is_absolute() else base / raw
        problem = image_file_problem(path) if check_images else None  # never raises (ENAMETOOLONG, EACCES)
        if problem is not None:
            missing_images.append(f"{csv}: row {index}: {problem}: {path}")
        label = None
        if has_label:
            label = parse_label(record["label"])
            if label is None and (require_label or str(record["label"]).strip()):
                bad_labels.append(
                    f"{csv}: row {index}: bad label {record['label']!r} "
                    f"(expected True/False, 1/0 or true/false)"
                )
        paths.append(path)
        raw_paths.append(raw)
        texts.append(" ".join(str(record["text_info"]).split()) if has_text else "")
        labels.append(label)
        rows.append(index)
    problems = (
        _limited(empty_paths, "empty paths", csv)
        + _limited(bad_labels, "bad labels", csv)
        + _limited(missing_images, "missing images", csv)
    )
    if problems:
        raise DataError(problems)
    keep_labels = has_label and all(label is not None for label in labels)
    return Split(
        csv=csv,
        paths=tuple(paths),
        texts=tuple(texts),
        labels=tuple(labels) if keep_labels else None,
        rows=tuple(rows),
        raw_paths=tuple(raw_paths),
    )


def resolve_csv(name, base_dir):
    """A split CSV named in the recipe: absolute, or relative to ``data.base_dir``."""
    path = Path(name)
    if path.is_absolute() or not base_dir:
        return path
    return Path(base_dir) / path


def load_splits(data_config, *, names=("train", "val", "test")):
    """Validate every split named in the recipe, collecting problems from all of them."""
    splits, problems = {}, []
    for name in names:
        csv = resolve_csv(getattr(data_config, name), data_config.base_dir)
        try:
            splits[name] = read_split(csv, data_config.base_dir or csv.parent)
        except DataError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataError(problems)
    for name in ("train", "val"):
        if name in splits:
            classes = set(splits[name].labels)
            if len(classes) < 2:
                only = "True" if classes == {1} else "False"
                raise DataError(
                    f"{splits[name].csv}: {name} split has only one class ({only}); "
                    f"AUROC and training need both"
                )
    return splits


def _read_frame(csv):
    """The CSV as a frame of strings; encoding and syntax problems name the line."""
    import io

    import pandas as pd

    try:
        data = csv.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{csv}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{csv}: is a directory, not a CSV file") from None
    except OSError as exc:
        raise DataError(f"{csv}: cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise DataError(
            f"{csv}: file is empty (expected a header: {','.join(REQUIRED_COLUMNS)})"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(_not_utf8(csv, data, exc)) from None
    try:
        return pd.read_csv(io.StringIO(text), keep_default_na=False, dtype=str)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{csv}: file is empty (expected a header: {','.join(REQUIRED_COLUMNS)})"
        ) from None
    except pd.errors.ParserError as exc:
        raise DataError(_parse_problem(csv, str(exc))) from None


def _not_utf8(csv, data, exc):
    line = data.count(b"\n", 0, exc.start) + 1
    byte = data[exc.start]
    hint = "re-save it as UTF-8"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f"{csv}: not UTF-8 text: it is UTF-16 (Excel's 'Unicode Text'); re-save it as UTF-8 (Excel: CSV UTF-8)"
    for legacy, label in (("cp949", "CP949/EUC-KR (Korean Windows/Excel)"), ("cp1252", "Windows-1252")):
        try:
            data.decode(legacy)
        except UnicodeDecodeError:
            continue
        hint = f"it looks like {label}; re-save it as UTF-8 (Excel: CSV UTF-8)"
        break
    return f"{csv}: line {line}: not UTF-8 text (byte 0x{byte:02x} at offset {exc.start}); {hint}"


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


def _missing_column_problems(csv, missing, found):
    """One line per missing column; a column that looks like it (a rename) is pointed out."""
    shown = ", ".join(found) or "(none)"
    candidates = [c for c in found if c not in REQUIRED_COLUMNS]
    problems = []
    for column in missing:
        hint = ""
        match = _close_column(column, candidates)
        if match:
            hint = f"; rename {match!r} to {column!r}"
        elif not any(c in found for c in REQUIRED_COLUMNS):
            hint = f"; the first line must be the header {','.join(REQUIRED_COLUMNS)}"
        problems.append(f"{csv}: missing column {column!r} (found: {shown}){hint}")
    return problems


def _close_column(column, candidates):
    lowered = {c.lower().replace(" ", "_"): c for c in candidates}
    if column in lowered:
        return lowered[column]
    match = closest(column, list(lowered))
    return lowered[match] if match else None
