"""Real data: mmcore recipes against strong classical baselines, on the same splits, in one table.

    python bench/real_data.py --quick          # 1 seed, a few minutes on 2 cores
    python bench/real_data.py                  # 3 seeds, every recipe (about an hour on 2 cores)
    python bench/real_data.py --datasets dredze --seeds 5 --data-root ../shared/data
    python bench/real_data.py --datasets multioff --recipes multimodal --set 'vision.name="imagestats"' ...
    python bench/real_data.py --datasets multioff --recipes multimodal --ensemble   # + the seeds' mean score

For each dataset (``dredze``: Dredze image spam; ``multioff``: offensive memes) it trains the
recipes ``recipes/<dataset>_{multimodal,vision_only,text_only}.toml`` (each a real ``mmcore run``
in a subprocess, one per seed) and computes, in this process on the same splits:

- TF-IDF of words (1-2) + character n-grams (2-5, ``char_wb``), logistic regression;
- all-MiniLM-L6-v2 embeddings (the real model, offline) + logistic regression;
- image statistics (the ``imagestats`` encoder's histograms of each image) + logistic regression;
- a classical multimodal reference: TF-IDF and image statistics side by side, one logistic regression;

each fit on train with ``C`` chosen on validation AUROC. Every choice is made on validation;
each final model scores the test split once. The table: test AUROC / AUPRC / F1 (F1 at the
threshold each run tuned on validation; for the references, at the max-F1 threshold on
validation), mean +- std over seeds, the mean of each seed's bootstrap 95% interval for AUROC,
the validation AUROC each choice was made on (the selected epoch's; for the references, the
chosen C's), and wall time per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"dredze": "dredze_image_spam", "multioff": "multioff"}
RECIPES = ("multimodal", "vision_only", "text_only")
C_GRID = (0.03, 0.1, 0.3, 1, 3, 10, 30, 100)


def load_split(root, name):
    """``(texts, labels, image paths)`` of one split."""
    import pandas as pd

    frame = pd.read_csv(root / f"{name}.csv", keep_default_na=False)
    texts = [" ".join(str(t).split()) for t in frame["text_info"]]
    labels = frame["label"].astype(str).str.lower().isin(("true", "1")).astype(int).to_numpy()
    return texts, labels, [root / p for p in frame["local_image_path"]]


def bootstrap_auroc(labels, scores, *, n=1000, seed=0):
    """95% percentile interval of AUROC over ``n`` resamples of the rows (stratified by label)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    values = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        values.append(roc_auc_score(labels[idx], scores[idx]))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def f1_at_val_threshold(val_labels, val_scores, test_labels, test_scores):
    from sklearn.metrics import f1_score, precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(val_labels, val_scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    threshold = thresholds[int(np.argmax(f1[:-1]))]
    return float(f1_score(test_labels, test_scores >= threshold))


def logistic_reference(features, splits):
    """LR on ``features(texts) -> matrix`` fit on train, C chosen on val AUROC; test metrics once."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, roc_auc_score

    start = time.perf_counter()
    (_, ytr, _), (_, yva, _), (_, yte, _) = splits
    xtr, xva, xte = features(*splits)
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5000).fit(xtr, ytr)
        auroc = roc_auc_score(yva, model.decision_function(xva))
        if best is None or auroc > best[0]:
            best = (auroc, c, model)
    val_auroc, c, model = best
    val_scores, scores = model.decision_function(xva), model.decision_function(xte)
    return {
        "auroc": [float(roc_auc_score(yte, scores))],
        "auprc": [float(average_precision_score(yte, scores))],
        "f1": [f1_at_val_threshold(yva, val_scores, yte, scores)],
        "ci": [bootstrap_auroc(yte, scores)],
        "val_auroc": [float(val_auroc)],
        "seconds": [time.perf_counter() - start],
        "note": f"C={c}",
    }


def tfidf_features(*splits):
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [split[0] for split in splits]
    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True).fit(texts[0])
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True).fit(texts[0])
    return [hstack([words.transform(x), chars.transform(x)]).tocsr() for x in texts]


_IMAGE_FEATURES = {}


def image_statistics(*splits):
    """The ``imagestats`` encoder (default params) on every image, decoded as mmcore decodes it:
    unit-norm square roots of histograms, as the recipes' heads see them."""
    import torch

    from mmcore.data.images import load_rgb
    from mmcore.testing import build

    encoder = build("vision", "imagestats")
    pre = encoder.preprocessing
    out = []
    for _, _, paths in splits:
        key = tuple(map(str, paths))
        if key not in _IMAGE_FEATURES:
            rows = []
            for i in range(0, len(paths), 64):
                batch = pre.collate([pre(load_rgb(p, target_size=pre.target_size)) for p in paths[i : i + 64]])
                with torch.no_grad():
                    rows.append(encoder(**batch).tokens[:, 0].numpy())
            _IMAGE_FEATURES[key] = np.concatenate(rows)
        out.append(_IMAGE_FEATURES[key])
    return out


def tfidf_and_image_statistics(*splits):
    """TF-IDF and the image statistics side by side, one LR (each block has unit norm: neither drowns the other)."""
    from scipy.sparse import csr_matrix, hstack

    text, image = tfidf_features(*splits), image_statistics(*splits)
    return [hstack([t, csr_matrix(i)]).tocsr() for t, i in zip(text, image)]


def _batched(encoder, texts, size=256):
    return np.concatenate([encoder(texts[i : i + size]).numpy() for i in range(0, len(texts), size)])


def minilm_features_batched(*splits):
    from mmcore.testing import build

    encoder = build("text", "minilm")
    return [_batched(encoder, split[0]) for split in splits]


def run_recipe(recipe, data_dir, out, seed, overrides):
    """One real ``mmcore run`` in a subprocess; its results.json and wall time."""
    command = [sys.executable, "-m", "mmcore", "run", str(recipe), "--out", str(out), "--quiet",
               "--set", f"seed={seed}", "--set", f"data.base_dir={str(data_dir)!r}"]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{recipe.name} (seed {seed}) failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text()), seconds, out


def seed_ensemble(data_dir, run_dirs, val_labels):
    """The seeds' runs of one recipe as one model: the mean of their scores.

    Each run scores the validation split with ``mmcore predict`` (a run keeps only its test
    predictions); the F1 threshold is tuned on the ensemble's validation scores.
    """
    import pandas as pd
    from sklearn.metrics import average_precision_score, roc_auc_score

    start = time.perf_counter()
    val, test, test_labels = [], [], None
    for run in run_dirs:
        scored = run / "val_scored.csv"
        result = subprocess.run(
            [sys.executable, "-m", "mmcore", "predict", str(run), str(data_dir / "val.csv"), "-o", str(scored), "--quiet"],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"mmcore predict {run} failed:\n{result.stderr[-3000:]}")
        val.append(pd.read_csv(scored)["score"].to_numpy(dtype=float))
        predictions = json.loads((run / "test_predictions.json").read_text())
        labels = np.array([int(bool(p["label"])) for p in predictions])
        if test_labels is not None and not np.array_equal(labels, test_labels):
            raise SystemExit(f"{run}: its test predictions are not in the other runs' order")
        test_labels = labels
        test.append(np.array([p["score"] for p in predictions]))
    val_scores, scores = np.mean(val, axis=0), np.mean(test, axis=0)
    return {
        "auroc": [float(roc_auc_score(test_labels, scores))],
        "auprc": [float(average_precision_score(test_labels, scores))],
        "f1": [f1_at_val_threshold(val_labels, val_scores, test_labels, scores)],
        "ci": [bootstrap_auroc(test_labels, scores)],
        "val_auroc": [float(roc_auc_score(val_labels, val_scores))],
        "seconds": [time.perf_counter() - start],
    }


def mmcore_rows(dataset, data_dir, seeds, out_root, quick, kinds=RECIPES, extra=(), ensemble_val_labels=None):
    """One row per recipe (mean +- std over seeds); with ``ensemble_val_labels`` also one row
    per recipe for the mean score of its seeds' runs."""
    rows = {}
    for kind in kinds:
        recipe = REPO / "recipes" / f"{dataset}_{kind}.toml"
        overrides = (["train.epochs=4"] if quick else []) + list(extra)
        metrics = {"auroc": [], "auprc": [], "f1": [], "ci": [], "val_auroc": [], "seconds": []}
        run_dirs = []
        for seed in seeds:
            results, seconds, run_dir = run_recipe(recipe, data_dir, out_root / dataset / f"{kind}-seed{seed}", seed, overrides)
            test = results["test"]["at_threshold"] if "at_threshold" in results["test"] else results["test"]
            metrics["auroc"].append(test["auroc"])
            metrics["auprc"].append(test["auprc"])
            metrics["f1"].append(test["f1"])
            metrics["val_auroc"].append(results["val"]["val_auroc"])
            predictions = json.loads((run_dir / "test_predictions.json").read_text())
            labels = np.array([int(bool(p["label"])) for p in predictions])
            scores = np.array([p["score"] for p in predictions])
            metrics["ci"].append(bootstrap_auroc(labels, scores))
            metrics["seconds"].append(seconds)
            run_dirs.append(run_dir)
            print(f"  {dataset} {kind} seed {seed}: test AUROC {test['auroc']:.4f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
        metrics["note"] = f"recipes/{recipe.name}" + "".join(f" --set {o}" for o in extra)
        rows[f"mmcore {kind}"] = metrics
        if ensemble_val_labels is not None and len(run_dirs) > 1:
            ensemble = seed_ensemble(data_dir, run_dirs, ensemble_val_labels)
            ensemble["note"] = f"mean score of the {len(run_dirs)} runs above (s: scoring val)"
            rows[f"mmcore {kind}, seed ensemble"] = ensemble
    return rows


def _mean_std(values, digits=4):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(all_rows):
    lines = ["| dataset | model | test AUROC | 95% CI (AUROC) | AUPRC | F1 | val AUROC | s / seed | seeds | how |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dataset, rows in all_rows.items():
        for model, m in rows.items():
            lo = statistics.mean(c[0] for c in m["ci"])
            hi = statistics.mean(c[1] for c in m["ci"])
            lines.append(
                f"| {dataset} | {model} | {_mean_std(m['auroc'])} | [{lo:.4f}, {hi:.4f}] | {_mean_std(m['auprc'])} | "
                f"{_mean_std(m['f1'])} | {_mean_std(m['val_auroc'])} | {statistics.mean(m['seconds']):.0f} | "
                f"{len(m['auroc'])} | {m['note']} |"
            )
    return "\n".join(lines)


def verdict(all_rows):
    """The issue's targets, each met or missed by how much."""
    targets = {"dredze": 0.995, "multioff": 0.75}
    lines = []
    for dataset, rows in all_rows.items():
        mean = {model: statistics.mean(m["auroc"]) for model, m in rows.items()}
        if "mmcore multimodal" not in mean:
            continue
        mm = mean["mmcore multimodal"]
        refs = {k: v for k, v in mean.items() if not k.startswith("mmcore")}
        checks = [(f"multimodal >= {targets[dataset]}", mm - targets[dataset])]
        unimodal = [mean[k] for k in ("mmcore vision_only", "mmcore text_only") if k in mean]
        if len(unimodal) == 2:
            checks.append(("multimodal >= best unimodal mmcore recipe", mm - max(unimodal)))
        checks += [(f"multimodal > {ref}", mm - value) for ref, value in refs.items()]
        if "mmcore multimodal, seed ensemble" in mean:
            checks.append((f"multimodal seed ensemble >= {targets[dataset]}", mean["mmcore multimodal, seed ensemble"] - targets[dataset]))
        for what, margin in checks:
            state = "met" if margin >= 0 else "MISSED"
            lines.append(f"{dataset}: {what}: {state} ({margin:+.4f})")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 epochs per recipe")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default="dredze,multioff")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "bench_runs" / "real_data")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON")
    parser.add_argument("--references-only", action="store_true", help="only the scikit-learn references (minutes: MiniLM embeds every text, each image is decoded)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="which recipes to train (default: all three)")
    parser.add_argument("--ensemble", action="store_true",
                        help="also a row per recipe for the mean score of its seeds' runs (a seed ensemble)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every run (as mmcore run --set), e.g. to measure a variant")
    args = parser.parse_args()
    seeds = [0] if args.quick else list(range(args.seeds))
    all_rows = {}
    for dataset in args.datasets.split(","):
        data_dir = (args.data_root / DATASETS[dataset]).resolve()
        if not (data_dir / "train.csv").is_file():
            raise SystemExit(f"{data_dir}: not found (pass --data-root)")
        splits = [load_split(data_dir, s) for s in ("train", "val", "test")]
        print(f"{dataset}: references", file=sys.stderr, flush=True)
        rows = {
            "TF-IDF words+chars + LR": logistic_reference(tfidf_features, splits),
            "MiniLM + LR": logistic_reference(minilm_features_batched, splits),
            "image statistics + LR": logistic_reference(image_statistics, splits),
            "TF-IDF + image statistics + LR": logistic_reference(tfidf_and_image_statistics, splits),
        }
        if not args.references_only:
            rows.update(mmcore_rows(
                dataset, data_dir, seeds, args.out, args.quick, args.recipes.split(","), args.overrides,
                ensemble_val_labels=splits[1][1] if args.ensemble else None,
            ))
        all_rows[dataset] = rows
    print(table(all_rows))
    if not args.references_only:
        print()
        print(verdict(all_rows))
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2))


if __name__ == "__main__":
    main()
