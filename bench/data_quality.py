"""Know your data, measured: ``mmcore audit`` on flipped labels, ``mmcore select`` against random
labelling, ``mmcore drift`` between datasets.

    python bench/data_quality.py --quick                                  # generated data, tiny encoders: the plumbing
    python bench/data_quality.py --data-root ../shared/data               # Dredze (+ MultiOFF for drift), 3 seeds
    python bench/data_quality.py --data-root ../shared/data --parts labels,drift --seeds 1   # a reduced run
    python bench/data_quality.py --data-root ../shared/data --parts labels --seeds 1 --folds 3 --max-rows 600
    python bench/data_quality.py --data-root ../shared/data --dataset multioff --parts labels --seeds 0  # what it flags

Parts (``--parts``, comma-separated):

- ``labels``: for each seed, flip 5 % of the training labels at random (seeded), ``audit`` the recipe (k-fold heads,
  ``--folds``), and count how many flipped rows its top K holds (K = the number of flips; the
  target is >= 80 %); the same audit of the clean data flags what share of rows (target < 2 %)
  and which rows come first (``--seeds 0``: the clean audit only).
- ``select``: start from 5 % of the training rows (stratified, seeded), four rounds of ``select``
  (each round trains on what is labelled so far and picks 3.75 % more) up to 20 %; random picks of
  the same size; training on everything. Test AUROC of each, and the paired bootstrap interval
  (1,000 resamples of the test rows) of select - random and select - everything.
- ``drift``: a run trained on the whole recipe, then ``drift`` of its training rows (frozen
  encoders, so the domain AUROC compares the same features; the training scores are memorised,
  so their PSI is not the point) and of another dataset's rows (MultiOFF; ``--quick``: the
  generated images inverted, rotated and without text): domain AUROC per modality, PSI, exit code.

Every run is a real ``mmcore run`` (``train_folds`` members included) of ``recipes/dredze_multimodal.toml``
(``--quick``: an imagestats + n-grams recipe on ``mmcore demo`` data). The figures are printed and
written to ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FLIP_SHARE = 0.05
QUICK_RECIPE = {
    "experiment": "data_quality_quick", "seed": 0,
    "data": {"num_workers": 0},
    "vision": {"name": "imagestats", "params": {"size": 48}},
    "text": {"name": "ngrams"},
    "pooling": {"name": "mean"},
    "fusion": {"name": "late", "params": {"hidden": [], "aux_weight": 1.0, "detach": True}},
    "head": {"name": "mlp", "params": {"hidden": [], "dropout": 0.0}},
    "loss": {"name": "bce"},
    "train": {"epochs": 20, "batch_size": 32, "learning_rate": 0.03, "weight_decay": 0.0,
              "early_stopping": {"patience": 5}},
    "logging": {"tensorboard": False, "progress": False},
}


def quiet(*args, **kwargs):
    pass


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def write_rows(path, columns, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def is_true(value):
    return str(value).strip().lower() in ("true", "1", "1.0")


def sample_rows(rows, cap, seed):
    """Sorted positions of at most ``cap`` of ``rows``, a seeded sample stratified by label (all when fewer)."""
    if cap is None or len(rows) <= cap:
        return list(range(len(rows)))
    rng = np.random.default_rng(seed)
    labels = np.array([is_true(r["label"]) if "label" in r else False for r in rows])
    picks = []
    for value in (True, False):
        members = np.flatnonzero(labels == value)
        picks += rng.choice(members, round(cap * members.size / len(rows)), replace=False).tolist()
    return sorted(picks)


class Dataset:
    """A recipe (as plain data) reading a dataset's CSVs; :meth:`recipe_file` writes a variant of it."""

    def __init__(self, name, root, recipe_data, csvs=None):
        self.name, self.root, self.recipe_data = name, Path(root).resolve(), recipe_data
        self.csvs = csvs or {split: self.root / f"{split}.csv" for split in ("train", "val", "test")}

    def csv(self, split):
        return self.csvs[split]

    def capped(self, folder, max_rows, seed=0):
        """The same dataset with at most ``max_rows`` training rows and ``max_rows // 4`` validation and
        test rows (each a seeded sample stratified by label; images still read from the dataset's folder)."""
        csvs = {}
        for split, cap in (("train", max_rows), ("val", max_rows // 4), ("test", max_rows // 4)):
            columns, rows = read_rows(self.csv(split))
            csvs[split] = write_rows(folder / f"{split}.csv", columns, [rows[i] for i in sample_rows(rows, cap, seed)])
        return Dataset(self.name, self.root, self.recipe_data, csvs)

    def recipe_file(self, path, *, train=None, val=None, seed=None):
        import tomli_w

        data = json.loads(json.dumps(self.recipe_data))
        data["data"] = {**data.get("data", {}), "base_dir": str(self.root), "train": str(train or self.csv("train")),
                        "val": str(val or self.csv("val")), "test": str(self.csv("test"))}
        if seed is not None:
            data["seed"] = seed
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(data), encoding="utf-8")
        return path


def train(recipe_path, out):
    import shutil

    from mmcore.commands.run import run_training
    from mmcore.quality.profile import profile_path
    from mmcore.recipe import load_recipe

    if profile_path(out).exists():  # a rerun of the bench reuses a finished run (its profile is written last)
        return out
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted bench left
    return run_training(load_recipe(recipe_path), recipe_path=recipe_path, out=out, progress=False, echo=quiet)


def test_auroc_and_scores(run):
    """``(AUROC, scores by image path, labels by image path)`` of a run's test split."""
    from sklearn.metrics import roc_auc_score

    records = json.loads((Path(run) / "test_predictions.json").read_text())
    scores = {r["path"]: r["score"] for r in records}
    labels = {r["path"]: int(r["label"]) for r in records}
    keys = sorted(scores)
    return roc_auc_score([labels[k] for k in keys], [scores[k] for k in keys]), scores, labels


def paired_bootstrap(a, b, *, n=1000, seed=0):
    """Mean and 95 % interval of AUROC(a) - AUROC(b) over resamples of the test rows both scored."""
    from sklearn.metrics import roc_auc_score

    (_, sa, labels), (_, sb, _) = a, b
    keys = sorted(set(sa) & set(sb))
    y = np.array([labels[k] for k in keys])
    xa, xb = np.array([sa[k] for k in keys]), np.array([sb[k] for k in keys])
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        pick = rng.integers(0, len(keys), len(keys))
        if y[pick].min() == y[pick].max():
            continue
        diffs.append(roc_auc_score(y[pick], xa[pick]) - roc_auc_score(y[pick], xb[pick]))
    return {"diff": round(float(roc_auc_score(y, xa) - roc_auc_score(y, xb)), 5),
            "low": round(float(np.percentile(diffs, 2.5)), 5), "high": round(float(np.percentile(diffs, 97.5)), 5)}


# ---------------------------------------------------------------- labels


def label_errors(dataset, work, seeds, folds):
    """Audit of the flipped and of the clean labels."""
    from mmcore.commands.audit import audit

    columns, rows = read_rows(dataset.csv("train"))
    out = {"flipped": [], "clean": None}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        flips = sorted(rng.choice(len(rows), round(FLIP_SHARE * len(rows)), replace=False).tolist())
        flipped = [dict(r) for r in rows]
        for i in flips:
            flipped[i]["label"] = "False" if is_true(flipped[i]["label"]) else "True"
        folder = work / f"labels-seed{seed}"
        train_csv = write_rows(folder / "train.csv", columns, flipped)
        recipe = dataset.recipe_file(folder / "recipe.toml", train=train_csv)
        started = time.perf_counter()
        result = audit(recipe, folds=folds, seed=seed, out_dir=folder / "audit", progress=False, echo=quiet)
        expected = {f"{train_csv}:{i + 1}" for i in flips}
        top = [issue.row for issue in result.issues.rows[:len(flips)]]
        flagged = {issue.row for issue in result.issues.rows if issue.is_issue}
        out["flipped"].append({
            "seed": seed, "flips": len(flips), "top_k_recall": round(len(expected & set(top)) / len(flips), 4),
            "flagged": result.issues.flagged, "flagged_that_are_flips": len(flagged & expected),
            "seconds": round(time.perf_counter() - started, 1), "label_issues": str(result.out / "label_issues.csv"),
        })
    started = time.perf_counter()
    recipe = dataset.recipe_file(work / "labels-clean" / "recipe.toml")
    result = audit(recipe, folds=folds, seed=0, out_dir=work / "labels-clean" / "audit", progress=False, echo=quiet)
    out["clean"] = {"rows": len(result.issues.rows), "flagged": result.issues.flagged,
                    "flagged_share": round(result.issues.flagged / len(result.issues.rows), 4),
                    "seconds": round(time.perf_counter() - started, 1),
                    "top": [{"row": i.row, "file": i.file, "given": i.given_label, "oof_score": round(i.oof_score, 4)}
                            for i in result.issues.rows[:5]]}
    return out


# ---------------------------------------------------------------- select


def active_selection(dataset, work, seeds, rounds=4, start=0.05, end=0.20):
    """``select`` rounds from ``start`` to ``end`` of the training rows against random picks and everything."""
    from mmcore.commands.select import select

    columns, rows = read_rows(dataset.csv("train"))
    n = len(rows)
    step = round((end - start) * n / rounds)
    pool = write_rows(work / "select-pool.csv", ["local_image_path", "text_info"], rows)
    full = test_auroc_and_scores(train(dataset.recipe_file(work / "select-full" / "recipe.toml"), work / "select-full" / "run"))
    out = {"full_auroc": round(full[0], 5), "seeds": []}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        labels = np.array([is_true(r["label"]) for r in rows])
        first = np.concatenate([rng.choice(np.flatnonzero(labels == c), max(1, round(start * (labels == c).sum())),
                                           replace=False) for c in (True, False)])
        folder = work / f"select-seed{seed}"
        chosen = [rows[i]["local_image_path"] for i in sorted(first.tolist())]
        by_path = {r["local_image_path"]: r for r in rows}
        picks = []
        for round_ in range(rounds):
            train_csv = write_rows(folder / f"round{round_}" / "train.csv", columns, [by_path[p] for p in chosen])
            run = train(dataset.recipe_file(folder / f"round{round_}" / "recipe.toml", train=train_csv, seed=seed),
                        folder / f"round{round_}" / "run")
            selection = select(run, pool, budget=step, seed=seed, exclude=picks, out=folder / f"round{round_}" / "selected.csv",
                               base_dir=dataset.root, progress=False, echo=quiet)
            picks.append(selection.out)
            chosen += [rows[r - 1]["local_image_path"] for r in selection.pool_rows]
        final_csv = write_rows(folder / "final" / "train.csv", columns, [by_path[p] for p in chosen])
        selected = test_auroc_and_scores(train(dataset.recipe_file(folder / "final" / "recipe.toml", train=final_csv, seed=seed),
                                               folder / "final" / "run"))
        rest = np.setdiff1d(np.arange(n), first)
        random_rows = sorted(first.tolist() + rng.choice(rest, len(chosen) - len(first), replace=False).tolist())
        random_csv = write_rows(folder / "random" / "train.csv", columns, [rows[i] for i in random_rows])
        random = test_auroc_and_scores(train(dataset.recipe_file(folder / "random" / "recipe.toml", train=random_csv, seed=seed),
                                             folder / "random" / "run"))
        out["seeds"].append({"seed": seed, "labelled": len(chosen), "select_auroc": round(selected[0], 5),
                             "random_auroc": round(random[0], 5), "select_minus_random": paired_bootstrap(selected, random),
                             "select_minus_full": paired_bootstrap(selected, full)})
    return out


# ---------------------------------------------------------------- drift


def drift_part(dataset, work, other_csv, other_root, drift_rows=None):
    """``drift`` of a full run against (a sample of ``drift_rows`` of) its own training rows and another dataset."""
    from mmcore.commands.drift import drift

    run = train(dataset.recipe_file(work / "select-full" / "recipe.toml"), work / "select-full" / "run")
    columns, rows = read_rows(dataset.csv("train"))
    own = write_rows(work / "drift-own-rows.csv", columns, [rows[i] for i in sample_rows(rows, drift_rows, 0)])
    out = {}
    for name, csv_path, base in (("own training rows", own, dataset.root),
                                 ("other dataset", other_csv, other_root)):
        report = drift(run, csv_path, out=work / f"drift-{name.split()[0]}", base_dir=base, progress=False, echo=quiet)
        out[name] = {"rows": report.new_rows, "domain_auroc": {m: v["auroc"] for m, v in report.domain_auroc.items()},
                     "psi": report.score["psi"], "exit_code": report.exit_code, "reasons": list(report.reasons)}
    out["held-out val vs test"] = val_versus_test(run, len(read_rows(dataset.csv("val"))[1]))
    return out


def val_versus_test(run, val_rows):
    """Domain AUROC between the profile's val rows and its test rows (both held out), folds grouped by
    near-duplicate cluster and not: the classifier's view of two samples split by campaign."""
    from mmcore.quality.drift import domain_auroc, near_duplicate_clusters
    from mmcore.quality.profile import profile_path, read_profile

    profile = read_profile(profile_path(run))
    if len(profile.sample_scores) != profile.rows:
        return None  # a sampled profile: its rows are not val then test
    clusters = near_duplicate_clusters(*profile.embeddings.values())
    out = {"rows": [val_rows, profile.rows - val_rows], "ungrouped": {}, "grouped": {}}
    for modality, embeddings in profile.embeddings.items():
        val, test = embeddings[:val_rows], embeddings[val_rows:]
        per_side = min(len(val), len(test))
        # domain_auroc draws per_side rows of each side with the seed: the clusters of exactly those rows
        rng = np.random.default_rng(0)
        picks = [np.sort(rng.choice(len(side), per_side, replace=False)) for side in (val, test)]
        groups = np.concatenate([clusters[:val_rows][picks[0]], clusters[val_rows:][picks[1]]])
        out["ungrouped"][modality] = round(domain_auroc(val, test), 3)
        out["grouped"][modality] = round(domain_auroc(val, test, groups=groups), 3)
    return out


# ---------------------------------------------------------------- quick data


def quick_data(work):
    """``mmcore demo`` data and a shifted copy of its test images (inverted, rotated, no text)."""
    from PIL import Image

    from mmcore.commands.demo import make_demo_dataset

    root = make_demo_dataset(work / "demo", n_train=160, n_val=60, n_test=60, size=(48, 48))
    shifted = work / "shifted"
    shifted.mkdir(parents=True, exist_ok=True)
    _, rows = read_rows(root / "test.csv")
    out = []
    for i, row in enumerate(rows):
        image = Image.open(root / row["local_image_path"]).convert("RGB").resize((96, 64)).rotate(90)
        Image.eval(image, lambda v: 255 - v).save(shifted / f"{i}.jpg")
        out.append({"local_image_path": f"{i}.jpg", "text_info": ""})
    write_rows(shifted / "new.csv", ["local_image_path", "text_info"], out)
    return Dataset("demo", root, QUICK_RECIPE), shifted / "new.csv", shifted


def report(results):
    lines = []
    labels = results.get("labels")
    if labels:
        for r in labels["flipped"]:
            lines.append(f"labels seed {r['seed']}: {r['flips']} flipped, top-K holds {r['top_k_recall']:.1%} of them; "
                         f"cleanlab flags {r['flagged']} rows ({r['flagged_that_are_flips']} of them flips) in {r['seconds']} s")
        clean = labels["clean"]
        lines.append(f"labels clean: {clean['flagged']} of {clean['rows']} rows flagged ({clean['flagged_share']:.2%})")
    chosen = results.get("select")
    if chosen:
        lines.append(f"select: training on everything, test AUROC {chosen['full_auroc']:.4f}")
        for r in chosen["seeds"]:
            d, f = r["select_minus_random"], r["select_minus_full"]
            lines.append(f"select seed {r['seed']}: {r['labelled']} labelled, AUROC select {r['select_auroc']:.4f} vs random "
                         f"{r['random_auroc']:.4f}: {d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]; vs everything "
                         f"{f['diff']:+.4f} [{f['low']:+.4f}, {f['high']:+.4f}]")
    for name, r in (results.get("drift") or {}).items():
        if name == "held-out val vs test":
            if r:
                lines.append(f"drift held-out val vs test ({r['rows'][0]} and {r['rows'][1]} rows of the profile), domain "
                             f"AUROC ungrouped {r['ungrouped']}, grouped by near-duplicate cluster {r['grouped']}")
            continue
        aurocs = ", ".join(f"{m} {v:.3f}" for m, v in r["domain_auroc"].items())
        lines.append(f"drift {name}: {r['rows']} rows, domain AUROC {aurocs}, score PSI {r['psi']:.3f}, exit {r['exit_code']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="generated data, imagestats + n-grams: the plumbing")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("bench-data-quality"))
    parser.add_argument("--dataset", choices=("dredze", "multioff"), default="dredze",
                        help="the recipes/<dataset>_multimodal.toml audited; drift compares with the other one")
    parser.add_argument("--parts", default="labels,select,drift")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-rows", type=int, default=None,
                        help="labels and select: at most this many training rows and a quarter as many val and test rows")
    parser.add_argument("--drift-rows", type=int, default=None, help="drift: at most this many of the own training rows")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        dataset, other_csv, other_root = quick_data(work)
    else:
        folders = {"dredze": "dredze_image_spam", "multioff": "multioff"}
        data = tomllib.loads((REPO / "recipes" / f"{args.dataset}_multimodal.toml").read_text(encoding="utf-8"))
        data["logging"] = {**data.get("logging", {}), "tensorboard": False, "progress": False}
        dataset = Dataset(args.dataset, args.data_root / folders[args.dataset], data)
        other = "multioff" if args.dataset == "dredze" else "dredze"
        other_root = (args.data_root / folders[other]).resolve()
        other_csv = other_root / "test.csv"
    seeds = list(range(args.seeds))
    results = {"dataset": dataset.name, "quick": args.quick, "folds": args.folds, "seeds": seeds}
    started = time.perf_counter()
    capped = dataset.capped(work / "capped", args.max_rows) if args.max_rows else dataset
    results["max_rows"], results["drift_rows"] = args.max_rows, args.drift_rows
    if "labels" in parts:
        results["labels"] = label_errors(capped, work, seeds, args.folds)
    if "select" in parts:
        results["select"] = active_selection(capped, work, seeds, rounds=args.rounds)
    if "drift" in parts:
        results["drift"] = drift_part(dataset, work, other_csv, other_root, args.drift_rows)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(report(results))
    print(f"wrote {work / 'results.json'} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
