"""Train big, serve small: the chain of issue 31 per dataset, each step a real CLI command, in one table.

    python bench/serve_small.py --quick                              # generated data, tiny encoders: the plumbing
    python bench/serve_small.py --datasets multioff --data-root ../shared/data
    python bench/serve_small.py --datasets dredze,multioff --seeds 3 --folds 5

Per dataset (``recipes/<dataset>_multimodal.toml``; ``--quick``: the demo recipe with tiny encoders
on generated ads), every step through the ``mmcore`` CLI in a subprocess:

1. ``mmcore run RECIPE --seeds N``: N single runs (their test AUROC, mean +- std) and their
   **seed ensemble** (greedy weights on validation); the **best single run** is the member with the
   best validation AUROC (a choice made on validation, never on test);
2. ``mmcore run RECIPE --folds K``: the **k-fold bag**, with its out-of-fold AUROC beside its test AUROC;
3. ``mmcore run RECIPE --set train.distill.teacher=ENSEMBLE``: the **distilled student** (one
   member's serving cost), ``mmcore export --quantize int8`` of it (**student int8**), and the
   **OCR-free student** (``recipes/<dataset>_vision_only.toml`` distilled from the same teacher),
   beside the same recipe trained on the labels alone (**vision-only on labels**, its baseline);
4. ``mmcore export`` of each (one bundle each; the ensemble and the bag as one graph);
5. the paired bootstrap of the test AUROC differences the targets name (student - teacher, bag -
   best single run, int8 - fp32 student, OCR-free student - teacher and - vision-only on labels),
   from the runs' ``test_predictions.json`` (``--differences-only --work W`` prints them again).

Columns: test AUROC (mean +- std where there are several runs) and its bootstrap 95% interval
(``results.json``'s, on the calibrated score), the validation or out-of-fold AUROC the choices
were made on, CPU rows/s through the bundle at batch 1 and 32 (onnxruntime on this machine's
threads, the graph and the host's text inputs only: images are decoded and preprocessed before
the clock starts), the bundle's size, and for the OCR-free student the Tesseract time per row it
avoids (``tesseract`` on the same test images, timed here). A step whose command is missing from
this mmcore (no ``train.distill``, no ``--quantize``) is printed as ``owed``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"dredze": "dredze_image_spam", "multioff": "multioff"}
#: --quick: the demo recipe with tiny random encoders, one epoch
QUICK_OVERRIDES = ("train.epochs=1", "vision.params.tiny=true", "text.params.tiny=true", "train.early_stopping.patience=1")
DISTILL = ("train.distill.temperature=2.0", "train.distill.weight=0.7")


class StepFailed(Exception):
    """A command of the chain failed; its last lines say why."""


def mmcore(*args, log):
    """``mmcore ARGS`` in a subprocess (its output appended to ``log``); seconds it took."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ mmcore {' '.join(map(str, args))}\n")
        handle.flush()
        result = subprocess.run([sys.executable, "-m", "mmcore", *map(str, args)], stdout=handle,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        tail = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise StepFailed(f"mmcore {args[0]} exited {result.returncode}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def has_distill():
    """Whether this mmcore has the ``train.distill`` recipe key and ``export --quantize``."""
    import attrs

    from mmcore.recipe import schema

    distill = "distill" in attrs.fields_dict(schema.TrainConfig)
    quantize = "quantize" in subprocess.run([sys.executable, "-m", "mmcore", "export", "--help"], capture_output=True,
                                            text=True).stdout
    return distill, quantize


def results(path):
    return json.loads((Path(path) / "results.json").read_text())


def test_auroc(res):
    return res["test"]["at_threshold"]["auroc"]


def interval(res):
    bounds = (res["test"].get("intervals") or {}).get("auroc")
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else ""


#: (step, its baseline, run folder of each under a dataset's work folder): the differences the
#: issue's targets name, each a paired bootstrap over the test rows both scored
DIFFERENCES = (
    ("distilled student", "seed ensemble", "student", "seeds"),
    ("bag", "best single run", "bag", "best"),
    ("student int8", "distilled student", "eval-student-int8", "student"),
    ("OCR-free student", "seed ensemble", "student-vision", "seeds"),
    ("OCR-free student", "vision-only on labels", "student-vision", "vision-only-labels"),
)


def paired_differences(work):
    """``[(step - baseline, diff, low, high)]`` for every pair of :data:`DIFFERENCES` whose two runs in
    ``work`` (one dataset's folder) have their ``test_predictions.json``; the best single run is the
    seed member ``best.txt`` names."""
    from data_quality import paired_bootstrap, test_auroc_and_scores  # bench/ is on sys.path when run

    best = work / "best.txt"
    folders = {"best": work / "seeds" / best.read_text().strip()} if best.is_file() else {}
    found = []
    for step, baseline, mine, theirs in DIFFERENCES:
        a, b = folders.get(mine, work / mine), folders.get(theirs, work / theirs)
        if (a / "test_predictions.json").is_file() and (b / "test_predictions.json").is_file():
            d = paired_bootstrap(test_auroc_and_scores(a), test_auroc_and_scores(b))
            found.append((f"{step} - {baseline}", d["diff"], d["low"], d["high"]))
    return found


def print_differences(name, found):
    print(f"\n{name}: paired bootstrap of the test AUROC differences (1000 resamples of the test rows both scored)\n")
    print("| difference | test AUROC diff | 95% interval |")
    print("|---|---|---|")
    for label, diff, low, high in found:
        print(f"| {label} | {diff:+.4f} | [{low:+.4f}, {high:+.4f}] |")


def bundle_mb(bundle):
    return sum(p.stat().st_size for p in Path(bundle).rglob("*") if p.is_file()) / (1 << 20)


def rows_per_second(bundle, split, *, batch, rows):
    """Rows/s of the bundle's graph (and host text inputs) at ``batch`` on ``rows`` test rows, CPU."""
    from mmcore.scoring.scorers import open_scorer

    scorer = open_scorer(bundle, device="cpu")
    n = min(rows, len(split))
    items = [scorer.preprocess(scorer.load_image(split.paths[i])) for i in range(n)] if scorer.uses_vision else None
    texts = [split.texts[i] or "" for i in range(n)] if scorer.uses_text else None
    scorer.logits(items[:1] if items else None, texts[:1] if texts else None)  # warm-up
    start = time.perf_counter()
    for first in range(0, n, batch):
        scorer.logits(items[first:first + batch] if items else None, texts[first:first + batch] if texts else None)
    return n / (time.perf_counter() - start)


def ocr_seconds_per_row(split, rows):
    """Tesseract's wall time per image on the first ``rows`` test images (None without tesseract)."""
    import shutil

    if shutil.which("tesseract") is None:
        return None
    n = min(rows, len(split))
    start = time.perf_counter()
    for i in range(n):
        subprocess.run(["tesseract", str(split.paths[i]), "-", "-l", "eng"], capture_output=True, check=False)
    return (time.perf_counter() - start) / n


def chain(name, data_dir, recipe, vision, args, work, log):
    """Every step for one dataset -> table rows (dicts) and lines saying what is owed. ``vision``:
    ``(recipe, overrides)`` of the OCR-free student."""
    from mmcore.data.csvs import read_split

    base = ["--quiet", "--set", f"data.base_dir={str(data_dir)!r}", *[x for o in args.overrides for x in ("--set", o)]]
    rows, owed = _Rows(name), []
    test = read_split(data_dir / "test.csv", data_dir)
    timed = {}

    def measure(label, bundle):
        timed[label] = {"b1": rows_per_second(bundle, test, batch=1, rows=args.timed_rows),
                        "b32": rows_per_second(bundle, test, batch=32, rows=args.timed_rows), "mb": bundle_mb(bundle)}

    seeds_dir, bag_dir = work / "seeds", work / "bag"
    seconds = mmcore("run", recipe, "--seeds", args.seeds, "--out", seeds_dir, *base, log=log)
    ensemble = json.loads((seeds_dir / "ensemble.json").read_text())
    members = [seeds_dir / m["dir"] for m in ensemble["members"]]
    singles = [results(m) for m in members]
    best = max(range(len(members)), key=lambda i: singles[i]["val"].get("val_auroc") or 0)
    (work / "best.txt").write_text(ensemble["members"][best]["dir"])  # for paired_differences
    for label, source in (("best single run", members[best]), ("seed ensemble", seeds_dir)):
        mmcore("export", source, "--out", work / f"bundle-{label.replace(' ', '-')}", "--quiet", log=log)
        measure(label, work / f"bundle-{label.replace(' ', '-')}")
    aurocs = [test_auroc(r) for r in singles]
    spread = f" ± {statistics.stdev(aurocs):.4f}" if len(aurocs) > 1 else ""
    rows.append({"row": f"single runs ({len(aurocs)} seeds)", "auroc": f"{statistics.mean(aurocs):.4f}{spread}",
                 "ci": "", "chosen_on": "", "note": f"{seconds / len(members):.0f} s per run"})
    rows.append({"row": "best single run", "auroc": f"{aurocs[best]:.4f}", "ci": interval(singles[best]),
                 "chosen_on": f"val {singles[best]['val'].get('val_auroc', 0):.4f}", **timed["best single run"],
                 "note": f"seed member {ensemble['members'][best]['dir']}"})
    ens = results(seeds_dir)
    rows.append({"row": "seed ensemble", "auroc": f"{test_auroc(ens):.4f}", "ci": interval(ens),
                 "chosen_on": f"val {ens['val']['auroc']:.4f}", **timed["seed ensemble"],
                 "note": "weights " + ", ".join(f"{m['weight']:.2f}" for m in ensemble["members"])})

    if args.folds:
        seconds = mmcore("run", recipe, "--folds", args.folds, "--out", bag_dir, *base, log=log)
        mmcore("export", bag_dir, "--out", work / "bundle-bag", "--quiet", log=log)
        measure("bag", work / "bundle-bag")
        bag = results(bag_dir)
        gap = bag["oof"]["auroc"] - test_auroc(bag)
        rows.append({"row": f"{args.folds}-fold bag", "auroc": f"{test_auroc(bag):.4f}", "ci": interval(bag),
                     "chosen_on": f"oof {bag['oof']['auroc']:.4f}", **timed["bag"],
                     "note": f"oof - test {gap:+.4f}; {seconds:.0f} s"})

    if args.no_students:
        return rows, owed
    distill, quantize = has_distill()
    if not distill:
        owed.append(f"{name}: distilled student, student int8, OCR-free student: owed (this mmcore has no train.distill)")
        return rows, owed
    teacher = f"train.distill.teacher={str(seeds_dir.resolve())!r}"
    student_dir = work / "student"
    seconds = mmcore("run", recipe, "--out", student_dir, *base, "--set", teacher,
                     *[x for o in DISTILL for x in ("--set", o)], log=log)
    mmcore("export", student_dir, "--out", work / "bundle-student", "--quiet", log=log)
    measure("student", work / "bundle-student")
    student = results(student_dir)
    rows.append({"row": "distilled student", "auroc": f"{test_auroc(student):.4f}", "ci": interval(student),
                 "chosen_on": f"val {student['val'].get('val_auroc', 0):.4f}", **timed["student"],
                 "note": f"teacher: seed ensemble; {seconds:.0f} s"})
    if quantize:
        try:
            mmcore("export", student_dir, "--out", work / "bundle-student-int8", "--quantize", "int8", "--quiet", log=log)
        except StepFailed as exc:
            owed.append(f"{name}: student int8: refused by its quality gate ({str(exc).splitlines()[-1]})")
        else:
            measure("int8", work / "bundle-student-int8")
            mmcore("eval", work / "bundle-student-int8", "--out", work / "eval-student-int8", "--quiet", log=log)
            int8 = results(work / "eval-student-int8")
            gate = json.loads((work / "bundle-student-int8" / "manifest.json").read_text())["quantization"]["gate"]
            rows.append({"row": "student int8", "auroc": f"{test_auroc(int8):.4f}", "ci": interval(int8), "chosen_on": "",
                         **timed["int8"], "note": f"gate: agreement {gate.get('agreement', float('nan')):.4f}"})
    else:
        owed.append(f"{name}: student int8: owed (this mmcore has no export --quantize)")
    vision_recipe, vision_overrides = vision
    if vision_recipe is not None:
        vision_dir = work / "student-vision"
        seconds = mmcore("run", vision_recipe, "--out", vision_dir, *base, "--set", teacher,
                         *[x for o in vision_overrides for x in ("--set", o)],
                         *[x for o in DISTILL for x in ("--set", o)], log=log)
        mmcore("export", vision_dir, "--out", work / "bundle-student-vision", "--quiet", log=log)
        measure("vision", work / "bundle-student-vision")
        vision = results(vision_dir)
        ocr = ocr_seconds_per_row(test, args.timed_rows)
        rows.append({"row": "OCR-free student", "auroc": f"{test_auroc(vision):.4f}", "ci": interval(vision),
                     "chosen_on": f"val {vision['val'].get('val_auroc', 0):.4f}", **timed["vision"],
                     "ocr": f"{ocr * 1000:.0f} ms" if ocr is not None else "(no tesseract)",
                     "note": f"{Path(vision_recipe).name}; {seconds:.0f} s"})
        # the baseline the OCR-free student must beat: the same recipe on the labels alone
        seconds = mmcore("run", vision_recipe, "--out", work / "vision-only-labels", *base,
                         *[x for o in vision_overrides for x in ("--set", o)], log=log)
        alone = results(work / "vision-only-labels")
        rows.append({"row": "vision-only on labels", "auroc": f"{test_auroc(alone):.4f}", "ci": interval(alone),
                     "chosen_on": f"val {alone['val'].get('val_auroc', 0):.4f}",
                     "note": f"{Path(vision_recipe).name}, no teacher; {seconds:.0f} s"})
    return rows, owed


class _Rows(list):
    """The table's rows, each printed as it is measured (a bench cut short still says what it measured)."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def append(self, row):
        super().append(row)
        print(f"{self.dataset}: {json.dumps(row)}", flush=True)


def print_table(name, rows):
    print(f"\n{name}\n")
    print("| step | test AUROC | 95% CI | chosen on | rows/s b1 | rows/s b32 | bundle MB | OCR avoided/row | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = (f"{r['b1']:.1f} | {r['b32']:.1f} | {r['mb']:.1f}") if "b1" in r else " |  | "
        print(f"| {r['row']} | {r['auroc']} | {r['ci']} | {r['chosen_on']} | {speed} | {r.get('ocr', '')} | {r['note']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="generated data, tiny encoders, 2 seeds, 2 folds: the plumbing")
    parser.add_argument("--datasets", default="dredze,multioff")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5, help="0: no bag")
    parser.add_argument("--timed-rows", type=int, default=64, help="test rows timed per bundle (and for OCR)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every run (repeatable)")
    parser.add_argument("--json", type=Path, help="also write every row as JSON")
    parser.add_argument("--no-students", action="store_true", help="stop after the seed ensemble and the bag")
    parser.add_argument("--differences-only", action="store_true",
                        help="with --work of an earlier run: print the paired differences of its datasets again")
    args = parser.parse_args(argv)
    if args.differences_only:
        if args.work is None:
            print("--differences-only needs --work (an earlier run's work folder)", file=sys.stderr)
            return 2
        for name in args.datasets.split(","):
            if (args.work / name / "seeds").is_dir():
                print_differences(name, paired_differences(args.work.resolve() / name))
        return 0
    if args.quick:
        args.seeds, args.folds, args.timed_rows = 2, 2, 8
        args.overrides = [*QUICK_OVERRIDES, *args.overrides]
    tables, differences, owed = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="mmcore-serve-small-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        log = work / "commands.log"
        work.mkdir(parents=True, exist_ok=True)
        print(f"bench/serve_small.py {'--quick ' if args.quick else ''}(commands and their output: {log})", flush=True)
        if args.quick:
            from mmcore.commands.demo import make_demo_dataset

            data = make_demo_dataset(work / "data", n_train=48, n_val=24, n_test=24, size=(48, 48))
            plan = {"demo": (data, REPO / "recipes" / "demo.toml", (REPO / "recipes" / "demo.toml",
                                                                  ['train.modality="vision_only"']))}
        else:
            plan = {name: (args.data_root / DATASETS[name], REPO / "recipes" / f"{name}_multimodal.toml",
                           (REPO / "recipes" / f"{name}_vision_only.toml", []))
                    for name in args.datasets.split(",")}
        for name, (data_dir, recipe, vision_recipe) in plan.items():
            try:
                rows, missing = chain(name, data_dir, recipe, vision_recipe, args, work / name, log)
            except StepFailed as exc:
                print(f"FAILED {name}: {exc}", file=sys.stderr)
                return 1
            tables[name] = list(rows)
            owed.extend(missing)
            print_table(name, rows)
            differences[name] = paired_differences(work / name)
            print_differences(name, differences[name])
    for line in owed:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"tables": tables, "differences": differences, "owed": owed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
