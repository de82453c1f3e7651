"""``mmcore predict BUNDLE_DIR new.csv -o out.csv``: the same columns as on a run, scored by the bundle.

Rows are validated as for a run (``read_split``), images decoded from their files, empty
texts filled by the recipe's OCR engine when it names one, and the output is the input CSV
with ``score``, ``calibrated_score`` and ``prediction`` added (written atomically).
"""

from __future__ import annotations

from pathlib import Path

import attrs

from mmcore.errors import DataError, MmcoreError


def predict_bundle(bundle_dir, input_csv, output, *, batch_size=None, base_dir=None, progress=True, echo=print):
    """Score every row of ``input_csv`` with the bundle in ``bundle_dir``; returns a PredictSummary."""
    from mmcore.commands.predict import PredictSummary, read_input, write_scored_csv
    from mmcore.data.images import BadImageError
    from mmcore.export.scoring import BundleScorer

    bundle_dir, input_csv, output = Path(bundle_dir), Path(input_csv), Path(output)
    if output.exists() and output.is_dir():
        raise MmcoreError(f"-o {output} is a folder; give a CSV file name")
    if input_csv.is_file() and output.exists() and output.resolve() == input_csv.resolve():
        raise MmcoreError(f"-o {output}: is the input CSV; write the predictions to another file")
    scorer = BundleScorer(bundle_dir)
    frame, split = read_input(input_csv, base_dir, require_text=scorer.uses_text, check_images=scorer.uses_vision)
    ocr = scorer.ocr
    if ocr and scorer.uses_text and not all(t.strip() for t in split.texts):
        from mmcore.store.root import cache_root
        from mmcore.ocr.fill import ocr_fill

        cache = cache_root((scorer.recipe_data.get("cache") or {}).get("dir"))
        texts = ocr_fill(list(split.paths), list(split.texts), ocr["engine"], ocr.get("lang", "eng"), cache,
                         progress=progress)
        split = attrs.evolve(split, texts=tuple(" ".join(t.split()) for t in texts))

    skip_bad = scorer.data_config.get("on_bad_image", "error") == "skip"
    batch_size = int(batch_size or (scorer.recipe_data.get("eval") or {}).get("batch_size")
                     or (scorer.recipe_data.get("train") or {}).get("batch_size") or 32)
    positions, logits, bad = [], [], []
    for start in range(0, len(split), batch_size):
        rows = range(start, min(start + batch_size, len(split)))
        items, kept = [], []
        for i in rows:
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
    raw, calibrated, predicted = scorer.decide(logits)

    write_scored_csv(output, frame, [split.rows[i] for i in positions], raw, calibrated, predicted)
    summary = PredictSummary(output=output, rows=len(frame), scored=len(positions), positives=int(predicted.sum()),
                             threshold=float(scorer.decision["threshold"]),
                             temperature=float(scorer.decision["temperature"]))
    echo(f"scored {summary.scored} of {summary.rows} rows of {input_csv} with bundle {bundle_dir}: "
         f"{summary.positives} predicted positive (calibrated_score >= {summary.threshold:.4f})")
    if summary.skipped:
        rows = "row" if summary.skipped == 1 else "rows"
        echo(f"{summary.skipped} {rows} skipped (unreadable images; score left empty, data.on_bad_image = \"skip\")")
    echo(f"wrote {output}")
    return summary
