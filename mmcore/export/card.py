"""The model card (``README.md``) every bundle carries, written from the run's ``results.json``.

What the model is (components, parameters, precision), the data it learned from and was tested
on (split files and row counts), its test metrics with their bootstrap intervals, the decision
(threshold, the rule that chose it, temperature), slices, the modality contribution and the
parity gate's figures, then how to call it. Every figure is the run's own, printed with four
decimals (``tests/test_export.py`` reads them back and compares them with ``results.json``).
"""

from __future__ import annotations

#: the test metrics of the card, as results.json names them under test.at_threshold
METRICS = ("auroc", "auprc", "f1", "precision", "recall", "accuracy", "specificity", "brier")


def fmt(value):
    """A figure as the card prints it: four decimals (three significant digits below 0.01), ``n/a``
    for none, integers as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, int)):
        return str(value)
    value = float(value)
    return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.4f}"


def model_card(*, bundle_name, recipe, results, decision, parity, manifest_info):
    """The card's Markdown. ``recipe``: the resolved recipe as data; ``results``: the run's
    results.json (None when the run has none: the card says so); ``parity``: parity.json's figures."""
    train, data = recipe.get("train") or {}, recipe.get("data") or {}
    modality = train.get("modality", "multimodal")
    lines = [f"# {recipe.get('experiment', 'mmcore model')}: an mmcore bundle", ""]
    if recipe.get("description"):
        lines += [recipe["description"], ""]
    lines += ["## The model", "", "| | |", "|---|---|", f"| modality | {modality} |"]
    for key in ("vision", "text", "pooling", "fusion", "head"):
        used = (key not in ("vision", "pooling") or modality != "text_only") and (
            key != "text" or modality != "vision_only") and (key != "fusion" or modality == "multimodal")
        if used and recipe.get(key):
            lines.append(f"| {key} | `{recipe[key].get('name')}` |")
    parameters = ((results or {}).get("trainable_parameters") or {}).get("all") or {}
    if parameters:
        lines.append(f"| parameters | {parameters.get('total')} ({parameters.get('trainable')} trained) |")
    lines += [f"| trained in | {train.get('precision', 'auto')} precision; the bundle computes in float32 |",
              f"| selected epoch | {manifest_info.get('selected_epoch')} |",
              f"| graph | {manifest_info['graph']['format']} (`{manifest_info['graph']['file']}`) |", ""]

    lines += ["## Data and splits", "", "| split | file | rows |", "|---|---|---|"]
    counts = (results or {}).get("data") or {}
    for split in ("train", "val", "test"):
        lines.append(f"| {split} | `{data.get(split, '')}` | {counts.get(split, 'n/a')} |")
    lines += ["", f"Images and CSVs under `{data.get('base_dir', '')}` when the run trained.", ""]

    lines += ["## Test metrics", ""]
    test = (results or {}).get("test")
    if not test:
        lines += ["The run has no test results (results.json is missing): `mmcore eval` the bundle on labelled data.", ""]
    else:
        at = test.get("at_threshold") or {}
        intervals = test.get("intervals") or {}
        level = intervals.get("level", 0.95)
        lines += [f"On the test split ({at.get('n')} rows, {at.get('positives')} positive), `calibrated_score` "
                  f"at the tuned threshold; {int(round(level * 100))}% bootstrap intervals "
                  f"({intervals.get('samples', 'n/a')} samples):", "",
                  "| metric | value | interval |", "|---|---|---|"]
        for name in METRICS:
            if name in at:
                low_high = intervals.get(name)
                shown = f"[{fmt(low_high[0])}, {fmt(low_high[1])}]" if low_high else ""
                lines.append(f"| {name} | {fmt(at[name])} | {shown} |")
        lines += ["", f"Confusion at the threshold: tp {at.get('tp')}, fp {at.get('fp')}, fn {at.get('fn')}, "
                  f"tn {at.get('tn')}. ECE of score (raw) {fmt(test.get('ece_raw'))}, of calibrated_score "
                  f"{fmt(test.get('ece_calibrated'))}.", ""]

    lines += ["## The decision", "",
              f"`prediction = calibrated_score >= {fmt(decision['threshold'])}` with "
              f"`calibrated_score = sigmoid(logit / {fmt(decision['temperature'])})`.", "",
              f"- threshold: {fmt(decision['threshold'])}, rule `{decision.get('rule')}`: {decision.get('description', '')}",
              f"- temperature: {fmt(decision['temperature'])} (fitted on validation: {decision.get('calibrated')})", ""]

    slices = (results or {}).get("slices") or {}
    if slices:
        lines += ["## Slices", "", "| slice | rows | positives | errors | accuracy | F1 | AUROC |",
                  "|---|---|---|---|---|---|---|"]
        for group, rows in slices.items():
            for row in rows:
                lines.append(f"| {group}: {row['slice']} | {row['n']} | {row['positives']} | {row['errors']} | "
                             f"{fmt(row.get('accuracy'))} | {fmt(row.get('f1'))} | {fmt(row.get('auroc'))} |")
        lines.append("")

    contribution = (results or {}).get("modality") or {}
    if contribution:
        lines += ["## Modality contribution", "", "| | |", "|---|---|"]
        for key, value in contribution.items():
            lines.append(f"| {key} | {fmt(value) if not isinstance(value, str) else value} |")
        lines.append("")

    if parity:
        lines += ["## Parity with the run", "",
                  f"On {parity['rows_compared']} rows of `{parity['data']}`, the bundle against the run's PyTorch model "
                  f"in {parity.get('torch_precision', 'fp32')}: max |Δ calibrated score| "
                  f"{parity['max_abs_calibrated_score_diff']:.2e} (tolerance {parity['tolerance']['score']:g}), "
                  f"decision agreement {fmt(parity['decision_agreement'])}.", ""]

    if manifest_info.get("quantization"):
        from mmcore.export.int8 import card_lines

        lines += card_lines(manifest_info["quantization"])

    inputs = "local_image_path" + (",text_info" if modality != "vision_only" else "")
    lines += ["## How to call it", "", "```bash",
              f"mmcore predict {bundle_name} new.csv -o scored.csv      # CSV columns: {inputs}",
              f"mmcore eval {bundle_name} --data labelled.csv           # metrics and report on labelled rows",
              f"mmcore serve {bundle_name} --port 8000",
              "curl -F image=@ad.jpg -F text=\"50% OFF today\" http://127.0.0.1:8000/predict",
              "```", "",
              "The answer holds `score` (raw sigmoid), `calibrated_score` and `prediction`. The bundle needs "
              "mmcore with the `export` extra (onnxruntime) and the plugins named above; nothing else of the run.", ""]
    return "\n".join(lines)
