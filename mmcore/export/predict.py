"""``mmcore predict BUNDLE_DIR new.csv -o out.csv``: the same columns as on a run, scored by the bundle.

Rows are validated as for a run (``read_split``), images decoded from their files, empty
texts filled by the recipe's OCR engine when it names one, and the output is the input CSV
with ``score``, ``calibrated_score`` and ``prediction`` added (written atomically).
:func:`score_bundle_rows` is the loop ``mmcore eval BUNDLE`` shares.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from mmcore.errors import DataError


def fill_text_by_ocr(scorer, split, *, progress=True):
    """``split`` with its empty texts read from the images by the recipe's OCR engine, when it names one."""
    ocr = scorer.ocr
    if not (ocr and scorer.uses_text and not all(t.strip() for t in split.texts)):
        return split
    from mmcore.store.root import cache_root
    from mmcore.ocr.fill import ocr_fill

    cache = cache_root((scorer.recipe_data.get("cache") or {}).get("dir"))
    texts = ocr_fill(list(split.paths), list(split.texts), ocr["engine"], ocr.get("lang", "eng"), cache,
                     progress=progress)
    return attrs.evolve(split, texts=tuple(" ".join(t.split()) for t in texts))


def batch_size_of(scorer, batch_size=None):
    """``--batch-size``, else the recipe's eval.batch_size, else its train.batch_size, else 32."""
    return int(batch_size or (scorer.recipe_data.get("eval") or {}).get("batch_size")
               or (scorer.recipe_data.get("train") or {}).get("batch_size") or 32)


def score_bundle_rows(scorer, split, *, batch_size):
    """Logits of every row of ``split`` whose image can be read -> ``(positions, logits, skipped)``.

    An unreadable image stops scoring with one line per row (a :class:`DataError`), or, with the
    recipe's ``data.on_bad_image = "skip"``, leaves its row out (``skipped`` counts them).
    """
    from mmcore.data.images import BadImageError

    skip_bad = scorer.data_config.get("on_bad_image", "error") == "skip"
    positions, logits, bad = [], [], []
    for start in range(0, len(split), batch_size):
        items, kept = [], []
        for i in range(start, min(start + batch_size, len(split))):
            if scorer.uses_vision:
                try:
                    items.append(scorer.preprocess(scorer.load_image(split.paths[i])))
                except BadImageError as exc:
                    bad.append(f"{split.csv}: row {split.rows[i]}: {split.paths[i]}: {exc}")
                    continue
            kept.append(i)
        if bad and not skip_bad:
            raise DataError(bad[:10] + ([f"... and {len(bad) - 10} more"] if len(bad) > 10 else []))
        if kept:
            texts = [split.texts[i] for i in kept] if scorer.uses_text else None
            logits.extend(scorer.logits(items if scorer.uses_vision else None, texts))
            positions.extend(kept)
    return np.asarray(positions, dtype=np.int64), np.asarray(logits, dtype=np.float64), len(bad)


def predict_bundle(bundle_dir, input_csv, output, *, batch_size=None, base_dir=None, device="auto", verify=None,
                   progress=True, echo=print):
    """Score every row of ``input_csv`` with the bundle in ``bundle_dir``; returns a PredictSummary."""
    from mmcore.commands.predict import PredictSummary, check_output_file, read_input, write_scored_csv
    from mmcore.export.scoring import BundleScorer

    bundle_dir, input_csv, output = Path(bundle_dir), Path(input_csv), Path(output)
    check_output_file(output, input_csv)
    scorer = BundleScorer(bundle_dir, device=device, verify=verify)
    frame, split = read_input(input_csv, base_dir, require_text=scorer.uses_text, check_images=scorer.uses_vision)
    split = fill_text_by_ocr(scorer, split, progress=progress)
    positions, logits, _ = score_bundle_rows(scorer, split, batch_size=batch_size_of(scorer, batch_size))
    raw, calibrated, predicted = scorer.decide(logits)

    write_scored_csv(output, frame, [split.rows[i] for i in positions], raw, calibrated, predicted)
    summary = PredictSummary(output=output, rows=len(frame), scored=len(positions), positives=int(predicted.sum()),
                             threshold=float(scorer.decision["threshold"]),
                             temperature=float(scorer.decision["temperature"]))
    echo(f"scored {summary.scored} of {summary.rows} rows of {input_csv} with bundle {bundle_dir} on "
         f"{scorer.device_name}: {summary.positives} predicted positive (calibrated_score >= {summary.threshold:.4f})")
    if summary.skipped:
        rows = "row" if summary.skipped == 1 else "rows"
        echo(f"{summary.skipped} {rows} skipped (unreadable images; score left empty, data.on_bad_image = \"skip\")")
    echo(f"wrote {output}")
    return summary
