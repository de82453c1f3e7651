"""``mmcore ensemble RUN... --out DIR``: finished runs -> one ensemble directory that every command
takes like a run (:mod:`mmcore.scoring.ensemble_dir` has its layout).

1. Each run must be a completed run directory with the same validation and test CSV content as
   the first (sha1 of each file); each is scored on both splits through the scoring path (its
   PyTorch model in float32 from the raw rows, as ``eval`` scores), one member loaded at a time.
2. Greedy forward selection with replacement on the validation scores
   (:func:`mmcore.evaluation.ensemble.select_ensemble`) gives the weights; a k-fold bag gives
   equal weights instead and fits its decision on the out-of-fold logits.
3. The combined logit's temperature and threshold are fitted on validation as a run's are
   (:func:`mmcore.engine.training.fit_decision`); the test split only gets measured.

The members are hard-linked into ``DIR/members/`` (a directory never names a path outside itself).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import numpy as np

from mmcore.engine.inference import sigmoid
from mmcore.errors import DataError, MmcoreError, RunError
from mmcore.evaluation.ensemble import DEFAULT_ITERATIONS, DEFAULT_METRIC, METRICS, select_ensemble
from mmcore.evaluation.metrics import rank_auroc
from mmcore.io import check_output_path, file_sha1_hex, write_json
from mmcore.rundir import RECIPE_FILE, RunDir
from mmcore.scoring import ensemble_dir as E
from mmcore.scoring.ensemble import combine_member_logits

#: members the command accepts (each is scored on validation and test)
MAX_RUNS = E.MAX_MEMBERS
#: how members are weighed: greedy selection on validation, or equally
WEIGHTINGS = ("greedy", "equal")


@attrs.frozen
class MemberScores:
    """One member's logits on the validation and test rows (positions into each split)."""

    run_dir: Path
    name: str
    val_logits: np.ndarray
    test_logits: np.ndarray


@attrs.frozen
class EnsembleSummary:
    """What :func:`build_ensemble` wrote."""

    out: Path
    weights: tuple
    val_auroc: float | None
    test_auroc: float | None


def check_member_runs(run_dirs):
    """Each path a completed run directory (not an ensemble, not a bundle), or one line naming it."""
    from mmcore.export.bundle import is_bundle

    if not run_dirs:
        raise MmcoreError("mmcore ensemble: give at least one run directory")
    if len(run_dirs) > MAX_RUNS:
        raise MmcoreError(f"mmcore ensemble: {len(run_dirs)} runs; at most {MAX_RUNS}")
    checked = []
    for path in map(Path, run_dirs):
        if E.is_ensemble(path):
            raise RunError(f"{path}: is an ensemble directory; give the run directories of its members")
        if is_bundle(path):
            raise RunError(f"{path}: is an export bundle; an ensemble combines run directories")
        if not path.is_dir():
            raise RunError(f"{path}: not a run directory (no such folder)")
        RunDir(path).require_completed()
        if not RunDir(path).best.is_file():
            raise RunError(f"{path}: not a run directory (no {RunDir(path).best.name})")
        checked.append(path)
    if len({p.resolve() for p in checked}) != len(checked):
        raise MmcoreError("mmcore ensemble: a run directory is given twice (weights come from the selection)")
    return checked


def split_csvs(recipe):
    """``{"val": Path, "test": Path}`` of a member's recipe (CSV splits only)."""
    from mmcore.data.csvs import resolve_csv

    if recipe.data.format != "csv":
        raise DataError(f"{recipe.experiment}: an ensemble's members read CSV splits (this run read {recipe.data.format})")
    return {name: resolve_csv(csv, recipe.data.base_dir) for name, csv in (("val", recipe.data.val), ("test", recipe.data.test))}


def data_digests(run_dirs, recipes):
    """``{"val_sha1", "test_sha1"}`` shared by every member, or one line naming the first that differs."""
    digests = None
    for run_dir, recipe in zip(run_dirs, recipes):
        mine = {f"{name}_sha1": file_sha1_hex(csv) for name, csv in split_csvs(recipe).items()}
        if digests is None:
            digests, first = mine, run_dir
        elif mine != digests:
            which = next(k for k in mine if mine[k] != digests[k]).removesuffix("_sha1")
            raise DataError(f"{run_dir}: its {which} CSV differs from {first}'s; an ensemble's members are "
                            f"selected and measured on the same rows")
    return digests


def score_member(run_dir, splits, *, registry=None, device="auto", progress=False):
    """A member's logits on the ``splits`` (``{"val": Split, "test": Split}``), scored from the raw
    rows in float32; an unreadable image stops here (members are compared row by row)."""
    from mmcore.scoring.rows import collect, score_rows
    from mmcore.scoring.run import RunScorer

    scorer = RunScorer(run_dir, registry=registry, device=device, progress=progress)
    logits = {}
    for name, split in splits.items():
        scored = collect(score_rows(scorer, split, registry=registry, on_bad_image="error", progress=progress,
                                    desc=f"{Path(run_dir).name} {name}"))
        logits[name] = scored.logits
    return logits


def build_ensemble(run_dirs, out, *, metric=DEFAULT_METRIC, iterations=DEFAULT_ITERATIONS, initial_best=0,
                   threshold=None, weighting="greedy", registry=None, device="auto", progress=True, echo=print):
    """``mmcore ensemble RUN... --out DIR`` (see the module docstring) -> :class:`EnsembleSummary`."""
    from mmcore.commands.export import check_new_folder

    out = Path(out)
    check_output_path(out, "ensemble directory", folder=True)
    check_new_folder(out, "--out")
    if metric not in METRICS:
        raise MmcoreError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
    run_dirs = check_member_runs(run_dirs)
    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    data_digests(run_dirs, [RunDir(d).load_recipe(registry) for d in run_dirs])  # named as given, before any link
    members_dir = out / E.MEMBERS_DIR
    linked, finished = [], False
    try:
        for index, run_dir in enumerate(run_dirs):
            experiment = RunDir(run_dir).recipe_data().get("experiment") or "run"
            linked.append(E.link_member(run_dir, members_dir / f"{index}-{_safe(experiment)}"))
        summary = assemble_ensemble(out, linked, source="runs", metric=metric, iterations=iterations,
                                    initial_best=initial_best, threshold=threshold, weighting=weighting,
                                    registry=registry, device=device, progress=progress, echo=echo)
        finished = True
        return summary
    finally:
        if not finished:  # whatever stopped it (a refusal, Ctrl-C): nothing half-made is left for a command to read
            shutil.rmtree(out, ignore_errors=True)


def assemble_ensemble(out, member_dirs, *, source, metric=DEFAULT_METRIC, iterations=DEFAULT_ITERATIONS,
                      initial_best=0, threshold=None, weighting="greedy", registry=None, device="auto", progress=True,
                      echo=print):
    """Select, decide and write the ensemble in ``out`` over ``member_dirs`` (run directories already
    in ``out/members/``): ensemble.json, decision.json, recipe.toml, results.json and the reports.

    ``weighting``: ``greedy`` (:func:`select_ensemble` on validation) or ``equal`` (every member
    once, no selection: what a small validation split cannot overfit)."""
    if weighting not in WEIGHTINGS:
        raise MmcoreError(f"--weights {weighting}: expected one of {', '.join(WEIGHTINGS)}")
    from mmcore.data.csvs import read_split
    from mmcore.engine.training import fit_decision

    out = Path(out)
    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    recipes = [RunDir(d).load_recipe(registry) for d in member_dirs]
    digests = data_digests(member_dirs, recipes)
    first = recipes[0]
    if threshold is not None:
        from mmcore.evaluation.threshold import parse_threshold_rule

        parse_threshold_rule(threshold)  # a bad rule is one line before anything is scored
        first = attrs.evolve(first, eval=attrs.evolve(first.eval, threshold=threshold))
    splits = {name: read_split(csv, first.data.base_dir, max_image_bytes=first.data.max_image_bytes)
              for name, csv in split_csvs(first).items()}
    scores = []
    for member_dir in member_dirs:
        logits = score_member(member_dir, splits, registry=registry, device=device, progress=progress)
        scores.append(MemberScores(member_dir, f"{E.MEMBERS_DIR}/{Path(member_dir).name}", logits["val"], logits["test"]))
    val_labels = splits["val"].label_array()
    member_val = np.stack([m.val_logits for m in scores])
    if weighting == "equal":
        weights, counts = [1.0 / len(scores)] * len(scores), [1] * len(scores)
        record = {"metric": None, "weights": "equal"}
    else:
        try:
            selection = select_ensemble([sigmoid(row) for row in member_val], val_labels, metric=metric,
                                        iterations=iterations, initial_best=initial_best)
        except ValueError as exc:
            raise DataError(f"{splits['val'].csv}: cannot select an ensemble on it ({exc})") from None
        weights, counts = selection.weights, selection.counts
        record = {**selection.to_json(), "initial_best": initial_best}
    val_logits = combine_member_logits(member_val, weights)
    decision = fit_decision(first, val_logits, val_labels)
    test_logits = combine_member_logits(np.stack([m.test_logits for m in scores]), weights)
    return write_ensemble_dir(
        out, scores, weights=weights, counts=counts, decision=decision, recipe=first, test=splits["test"],
        source=source, digests=digests, test_logits=test_logits,
        selection={**record, "rows": "val", "n": int(len(val_labels))},
        member_val_auroc=[_auroc(m.val_logits, val_labels) for m in scores],
        fitted_on={"val": {"auroc": _auroc(val_logits, val_labels), "n": int(len(val_labels))}}, echo=echo,
    )


def write_ensemble_dir(out, scores, *, weights, counts, decision, recipe, test, source, digests, test_logits, selection,
                       member_val_auroc, fitted_on, echo=print):
    """Every file of the ensemble directory but its members (already in place). ``fitted_on``: the
    rows the weights and decision were fitted on, ``{"val": {"auroc", "n"}}`` or ``{"oof": ...}``."""
    from mmcore.engine.outputs import write_evaluation

    out = Path(out)
    shutil.copyfile(Path(scores[0].run_dir) / RECIPE_FILE, out / RECIPE_FILE)
    write_json(out / E.DECISION_FILE, decision)
    entries = [E.member_entry(m.run_dir, m.name, w, c) for m, w, c in zip(scores, weights, counts)]
    E.write_ensemble(out, source=source, members=entries, selection=selection, data=digests)
    test_labels = test.label_array()
    members = [
        {"dir": m.name, "weight": float(w), "experiment": RunDir(m.run_dir).recipe_data().get("experiment"),
         "val_auroc": val_auroc, "test_auroc": _auroc(m.test_logits, test_labels)}
        for m, w, val_auroc in zip(scores, weights, member_val_auroc)
    ]
    (rows, fitted), = fitted_on.items()
    summary = {
        "experiment": recipe.experiment,
        "kind": "ensemble",
        "source": source,
        "run_dir": str(out),
        "selected_epoch": None,
        "selection_metric": "auroc",
        "val": {"auroc": fitted["auroc"]},
        **({rows: fitted} if rows != "val" else {}),
        "members": members,
        "selection": selection,
        "data": {rows: fitted["n"], "test": len(test_labels)},
    }
    results, _ = write_evaluation(
        out, split=test, indices=np.arange(len(test)), logits=test_logits, labels=test_labels, decision_info=decision,
        summary=summary, title=f"mmcore — ensemble of {len(scores)} ({recipe.experiment})",
    )
    RunDir(out).write_status("completed", kind="ensemble")
    test_auroc = results["test"]["at_threshold"]["auroc"]
    picked = ", ".join(f"{m['dir']} {m['weight']:.3f}" for m in members)
    echo(f"ensemble of {len(scores)} runs ({source}): weights {picked}")
    named = {"val": "validation", "oof": "out-of-fold"}[rows]
    echo(f"{named} AUROC {fitted['auroc']:.4f}; test AUROC {test_auroc:.4f} "
         f"(best member {max(m['test_auroc'] for m in members):.4f}); threshold {decision['threshold']:.4f}, "
         f"temperature {decision['temperature']:.3g}")
    echo(f"wrote {out}")
    return EnsembleSummary(out=out, weights=tuple(float(w) for w in weights), val_auroc=fitted["auroc"],
                           test_auroc=test_auroc)


def _auroc(logits, labels):
    if len(set(np.asarray(labels).tolist())) < 2:
        return None
    return float(rank_auroc(np.asarray(logits, dtype=np.float64), np.asarray(labels)))



def _safe(name):
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:64] or "run"


def seed_members_dir(out):
    """Where ``run --seeds`` trains its members: ``out/members``."""
    return Path(out) / E.MEMBERS_DIR


def train_seed_ensemble(recipe_path, overrides=(), *, seeds, out=None, registry=None, progress=True, echo=print):
    """``mmcore run RECIPE --seeds N``: N runs of the recipe with seeds ``seed .. seed + N - 1`` in
    ``out/members/seed-<s>/``, then the ensemble of them in ``out`` (``source = "seeds"``).

    The runs share the recipe's feature cache (its tenant is keyed by encoder identity and file
    content, not by seed), so frozen encoders run once for every seed. Returns the ensemble's
    :class:`EnsembleSummary`.
    """
    import time

    from mmcore.commands.export import check_new_folder
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe
    from mmcore.recipe.schema import MAX_SEED

    loaded = load_recipe(recipe_path, overrides)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_RUNS:
        raise MmcoreError(f"--seeds {seeds}: must be an integer from 1 to {MAX_RUNS}")
    if loaded.seed + seeds - 1 > MAX_SEED:
        raise MmcoreError(f"--seeds {seeds}: seeds {loaded.seed}..{loaded.seed + seeds - 1} pass {MAX_SEED}; "
                          f"set a lower seed")
    out = Path(out) if out else Path(loaded.output_dir) / loaded.experiment / f"seeds-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_path(out, "ensemble directory", folder=True)
    check_new_folder(out, "--out")
    members = []
    for seed in range(loaded.seed, loaded.seed + seeds):
        echo(f"== seed {seed} ({len(members) + 1} of {seeds}) ==")
        members.append(run_training(attrs.evolve(loaded, seed=seed), recipe_path=recipe_path,
                                    out=seed_members_dir(out) / f"seed-{seed}", registry=registry, progress=progress,
                                    echo=echo))
    return assemble_ensemble(out, members, source="seeds", registry=registry, progress=progress, echo=echo)



def train_fold_bag(recipe_path, overrides=(), *, folds, out=None, group_column=None, registry=None, device="auto",
                   progress=True, echo=print):
    """``mmcore run RECIPE --folds K``: one member per fold of train + val
    (:func:`mmcore.commands.kfold.train_folds`: stratified, grouped by image content and
    ``group_column``, each member choosing its epoch on its held-out fold), combined with equal
    weights as an ensemble in ``out`` whose temperature and threshold are fitted on the out-of-fold
    scores (``out/oof_scores.csv``); the test split is only measured. Returns the :class:`EnsembleSummary`."""
    import time

    from mmcore.commands.kfold import train_folds
    from mmcore.recipe import load_recipe

    loaded = load_recipe(recipe_path, overrides, registry=registry)
    out = Path(out) if out else Path(loaded.output_dir) / loaded.experiment / f"folds-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_path(out, "ensemble directory", folder=True)
    runs = train_folds(loaded, k=folds, out=out, seed=loaded.seed, group_column=group_column, registry=registry,
                       progress=progress, echo=echo, recipe_path=recipe_path)
    return assemble_bag(out, runs, recipe=loaded, registry=registry, device=device, progress=progress, echo=echo)


def assemble_bag(out, fold_runs, *, recipe, registry=None, device="auto", progress=True, echo=print):
    """The ensemble of a k-fold bag (``source = "folds"``) in ``out``: equal weights (each labelled row
    has one out-of-fold score, so there is nothing to select on), the decision fitted on
    ``combined_logit`` of the out-of-fold scores, the members' mean measured on the test split."""
    from mmcore.data.csvs import read_split, resolve_csv
    from mmcore.engine.training import fit_decision

    members = [Path(m) for m in fold_runs.members]
    k = len(members)
    weights = [1.0 / k] * k
    test_csv = resolve_csv(recipe.data.test, recipe.data.base_dir)
    test = read_split(test_csv, recipe.data.base_dir, max_image_bytes=recipe.data.max_image_bytes)
    oof = fold_runs.oof
    scores = []
    for index, member in enumerate(members):
        held_out = oof.folds == index  # member i held out fold i (train_folds' order)
        logits = score_member(member, {"test": test}, registry=registry, device=device, progress=progress)
        scores.append(MemberScores(member, f"{E.MEMBERS_DIR}/{member.name}", oof.logits[held_out], logits["test"]))
    oof_logits = combine_member_logits(oof.logits[None, :], [1.0])  # one member per row: its clipped logit
    decision = fit_decision(recipe, oof_logits, oof.labels)
    test_logits = combine_member_logits(np.stack([m.test_logits for m in scores]), weights)
    n = int(len(oof.labels))
    return write_ensemble_dir(
        out, scores, weights=weights, counts=[1] * k, decision=decision, recipe=recipe, test=test, source="folds",
        digests={"test_sha1": file_sha1_hex(test_csv)}, test_logits=test_logits,
        selection={"metric": None, "rows": "out-of-fold", "n": n, "weights": "equal"},
        member_val_auroc=[_auroc(oof.logits[oof.folds == i], oof.labels[oof.folds == i]) for i in range(k)],
        fitted_on={"oof": {"auroc": _auroc(oof_logits, oof.labels), "n": n}}, echo=echo,
    )
