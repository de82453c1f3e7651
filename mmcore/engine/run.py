"""``mmcore run`` and ``mmcore eval``: a run directory is the unit of everything.

``runs/<experiment>/<timestamp>/`` holds the resolved recipe, ``checkpoint_best.ckpt``,
``last.ckpt``, ``results.json``, ``test_predictions.json``, ``test_report.md``,
``report.html``, plots, TensorBoard logs and ``status.json``.
"""

from __future__ import annotations

import copy
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from ..data.csvs import load_splits, read_split, resolve_csv
from ..errors import DataError, MmcoreError, RunError
from ..evaluation.calibration import fit_temperature
from ..evaluation.metrics import binary_metrics
from ..evaluation.threshold import parse_threshold_rule, tune_threshold
from ..io import write_text
from ..model import build_component
from ..recipe import recipe_from_dict, recipe_to_dict, recipe_to_toml
from ..trainability import parameter_groups, trainable_summary
from .checkpoint import load_model_state, make_checkpoint, read_checkpoint, save_checkpoint
from .loop import BadImages, Trainer, sigmoid, total_steps
from .outputs import require_completed, write_evaluation, write_status
from .pipeline import Pipeline
from .runtime import is_main

RECIPE_FILE = "recipe.toml"
BEST = "checkpoint_best.ckpt"
LAST = "last.ckpt"


def make_run_dir(recipe, out=None):
    """``<output_dir>/<experiment>/<timestamp>`` (or ``out``), created empty."""
    if out is not None:
        run_dir = Path(out)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunError(f"{run_dir}: output directory exists and is not empty")
    else:
        base = Path(recipe.output_dir) / recipe.experiment
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = base / stamp
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = base / f"{stamp}-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def metric_mode(metric):
    """Losses are minimized, everything else maximized."""
    return "min" if metric.endswith("loss") or metric.endswith("brier") or metric.endswith("ece") else "max"


def epoch_metrics(logits, labels, loss_fn, prefix="val"):
    """Validation metrics of one epoch (prefixed), from CPU logits."""
    scores = sigmoid(logits)
    metrics = binary_metrics(scores, labels, 0.5)
    loss = loss_fn(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.float32))
    out = {f"{prefix}_loss": float(loss)}
    for key in ("auroc", "auprc", "accuracy", "f1", "precision", "recall"):
        out[f"{prefix}_{key}"] = metrics.get(key)
    return out


def _open_writer(recipe, run_dir):
    if not recipe.logging.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))


def run_training(recipe, *, recipe_path, out=None, registry=None, progress=True, echo=print):
    """Train, select, calibrate and evaluate; returns the run directory."""
    if registry is None:
        from ..plugins import get_registry

        registry = get_registry()
    started = time.perf_counter()
    splits = load_splits(recipe.data)  # all data problems before anything heavy
    label_counts = _label_counts(splits["train"])
    run_dir = make_run_dir(recipe, out)
    write_text(run_dir / RECIPE_FILE, recipe_to_toml(recipe))
    write_status(run_dir, "running")
    try:
        result = _train(recipe, registry, splits, label_counts, run_dir, recipe_path, progress, echo)
    except KeyboardInterrupt:
        write_status(run_dir, "interrupted")
        raise
    except BaseException as exc:
        write_status(run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    result["seconds"] = round(time.perf_counter() - started, 2)
    write_status(run_dir, "completed", seconds=result["seconds"])
    echo(summary_screen(result, run_dir))
    return run_dir


def _label_counts(split):
    labels = split.label_array()
    return int((labels == 0).sum()), int((labels == 1).sum())


def _train(recipe, registry, splits, label_counts, run_dir, recipe_path, progress, echo):
    pipeline = Pipeline(recipe, registry, source=str(recipe_path), progress=progress)
    model = pipeline.model
    bad_images = BadImages(recipe.data.on_bad_image)
    datasets = {}
    for name in ("train", "val", "test"):
        dataset, split, errors = pipeline.dataset(splits[name], train=name == "train")
        if errors:
            bad_images.check({"errors": errors}, name)
        datasets[name] = (dataset, split)
    train_loader = pipeline.loader(datasets["train"][0], train=True)
    val_loader = pipeline.loader(datasets["val"][0])
    test_loader = pipeline.loader(datasets["test"][0])

    loss_fn = build_component(registry, "loss", recipe.loss, label_counts)
    groups = parameter_groups(
        model,
        head_lr=recipe.train.learning_rate,
        backbone_lr=recipe.train.backbone_lr,
        lora_lr=recipe.train.lora_lr,
        weight_decay=recipe.train.weight_decay,
    )
    optimizer = torch.optim.AdamW(groups)
    steps = total_steps(len(train_loader), recipe.train.grad_accum_steps, recipe.train.epochs)
    scheduler = build_component(registry, "scheduler", recipe.scheduler, optimizer, steps)
    writer = _open_writer(recipe, run_dir)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        device=pipeline.device,
        dtype=pipeline.dtype,
        grad_accum_steps=recipe.train.grad_accum_steps,
        grad_clip=recipe.train.grad_clip,
        on_nan=recipe.train.on_nan,
        bad_images=bad_images,
        writer=writer,
        progress=progress,
        channels_last=pipeline.channels_last,
    )
    recipe_dict = recipe_to_dict(recipe)
    metric = recipe.train.early_stopping.metric
    mode = metric_mode(metric)
    best_value, best_epoch, best_state, best_metrics = None, 0, None, {}
    history, since_best = [], 0
    for epoch in range(1, recipe.train.epochs + 1):
        epoch_start = time.perf_counter()
        train_loss = trainer.train_epoch(train_loader, epoch, recipe.train.epochs)
        _, val_logits, val_labels = trainer.predict(val_loader, "val")
        metrics = epoch_metrics(val_logits, val_labels, loss_fn)
        if metric not in metrics:
            raise MmcoreError(
                f"{recipe_path}: train.early_stopping.metric: unknown metric {metric!r} "
                f"(one of {', '.join(metrics)})"
            )
        row = {"epoch": epoch, "train_loss": train_loss, **metrics, "epoch_time_s": time.perf_counter() - epoch_start}
        history.append(row)
        if writer is not None:
            for key, value in metrics.items():
                if value is not None:
                    writer.add_scalar(f"val/{key.removeprefix('val_')}", value, epoch)
            writer.add_scalar("train/epoch_loss", train_loss, epoch)
        value = metrics[metric]
        improved = value is not None and (
            best_value is None or (value > best_value if mode == "max" else value < best_value)
        )
        if improved:
            best_value, best_epoch, best_metrics = value, epoch, metrics
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            save_checkpoint(
                run_dir / BEST,
                make_checkpoint(model, recipe_dict=recipe_dict, epoch=epoch, metrics=metrics),
            )
            since_best = 0
        else:
            since_best += 1
        if progress:
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            echo(f"epoch {epoch}: train_loss={train_loss:.4f} {shown}{' *' if improved else ''}")
        patience = recipe.train.early_stopping.patience
        if patience and since_best >= patience:
            echo(f"early stopping: {metric} has not improved for {patience} epochs (best epoch {best_epoch})")
            break
    if best_state is None:
        raise RunError(f"{metric} was never computed (validation has one class?); no checkpoint selected")
    model.load_state_dict(best_state)

    # decision: temperature + threshold on validation, then the test split
    _, val_logits, val_labels = trainer.predict(val_loader, "val")
    decision = fit_decision(recipe, val_logits, val_labels)
    test_indices, test_logits, test_labels = trainer.predict(test_loader, "test")
    summary = {
        "experiment": recipe.experiment,
        "run_dir": str(run_dir),
        "selected_epoch": best_epoch,
        "selection_metric": metric,
        "epochs_trained": len(history),
        "val": best_metrics,
        "history": history,
        "data": {name: len(datasets[name][1]) for name in datasets},
        "skipped_images": bad_images.counts(),
        "skipped_nan_steps": trainer.skipped_nan_steps,
        "trainable_parameters": trainable_summary(model),
        "feature_cache": {"vision": pipeline.cache_vision, "text": pipeline.cache_text},
    }
    results, _ = write_evaluation(
        run_dir,
        split=datasets["test"][1],
        indices=test_indices,
        logits=test_logits,
        labels=test_labels,
        decision_info=decision,
        summary=summary,
        history=history,
        title=f"mmcore — {recipe.experiment}",
    )
    ckpt = make_checkpoint(
        model, recipe_dict=recipe_dict, epoch=best_epoch, metrics=best_metrics, extra={"decision": decision}
    )
    save_checkpoint(run_dir / BEST, ckpt)
    if writer is not None:
        _log_hparams(writer, recipe, results)
        _log_pr_curve(writer, test_logits, test_labels, best_epoch)
        writer.close()
    return results


def fit_decision(recipe, val_logits, val_labels):
    """Temperature (if ``eval.calibrate``) and threshold (``eval.threshold``) from validation."""
    temperature = 1.0
    if recipe.eval.calibrate and len(set(val_labels.tolist())) == 2:
        temperature = float(fit_temperature(val_logits, val_labels))
    scores = sigmoid(np.asarray(val_logits) / temperature)
    rule = parse_threshold_rule(recipe.eval.threshold)
    threshold, description = tune_threshold(scores, val_labels.astype(int), rule)
    return {
        "threshold": float(threshold),
        "rule": recipe.eval.threshold,
        "description": description,
        "temperature": temperature,
        "calibrated": bool(recipe.eval.calibrate),
        "val_ece_raw": binary_metrics(sigmoid(val_logits), val_labels, 0.5)["ece"],
        "val_ece_calibrated": binary_metrics(scores, val_labels, 0.5)["ece"],
    }


def _log_hparams(writer, recipe, results):
    flat = {
        "vision": recipe.vision.name,
        "text": recipe.text.name,
        "pooling": recipe.pooling.name,
        "fusion": recipe.fusion.name,
        "modality": recipe.train.modality,
        "batch_size": recipe.train.batch_size,
        "learning_rate": recipe.train.learning_rate,
        "epochs": recipe.train.epochs,
        "loss": recipe.loss.name,
    }
    test = (results.get("test") or {}).get("at_threshold") or {}
    metrics = {f"hparam/test_{k}": v for k, v in test.items() if k in ("auroc", "auprc", "f1", "accuracy") and v is not None}
    if metrics:
        writer.add_hparams(flat, metrics, run_name=".")


def _log_pr_curve(writer, logits, labels, step):
    if len(labels):
        writer.add_pr_curve("test/pr_curve", torch.as_tensor(labels).int(), torch.as_tensor(sigmoid(logits)), step)


def summary_screen(results, run_dir):
    """The one-screen summary printed at the end of a run."""
    test = (results.get("test") or {}).get("at_threshold") or {}
    half = (results.get("test") or {}).get("at_0.5") or {}
    decision = results.get("decision", {})

    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        "",
        f"== {results['experiment']} ==  ({results.get('seconds', 0):.1f} s)",
        f"run dir        {run_dir}",
        f"selected epoch {results['selected_epoch']} of {results['epochs_trained']} "
        f"({results['selection_metric']} = {fmt(results['val'].get(results['selection_metric']))})",
        f"threshold      {decision.get('threshold', 0.5):.4f}  ({decision.get('description', '')})",
        f"test AUROC     {fmt(test.get('auroc'))}   AUPRC {fmt(test.get('auprc'))}",
        f"test F1        {fmt(test.get('f1'))} at threshold, {fmt(half.get('f1'))} at 0.5",
        f"test accuracy  {fmt(test.get('accuracy'))}   precision {fmt(test.get('precision'))}   recall {fmt(test.get('recall'))}",
        f"reports        {Path(run_dir) / 'report.html'}  {Path(run_dir) / 'test_report.md'}",
    ]
    skipped = results.get("skipped_images") or {}
    if skipped:
        lines.append(f"skipped images {skipped}")
    return "\n".join(lines)


# ---------------------------------------------------------------- eval


def load_run(run_dir, *, registry=None, progress=True):
    """Rebuild a finished run's model from its recipe and best checkpoint -> (pipeline, ckpt)."""
    if registry is None:
        from ..plugins import get_registry

        registry = get_registry()
    run_dir = Path(run_dir)
    require_completed(run_dir)
    recipe_path = run_dir / RECIPE_FILE
    try:
        data = tomllib.loads(recipe_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RunError(f"{recipe_path}: cannot read the run's recipe ({exc})") from None
    recipe = recipe_from_dict(data, source=str(recipe_path), registry=registry)
    ckpt = read_checkpoint(run_dir / BEST)
    if ckpt.get("recipe") != recipe_to_dict(recipe):
        differing = _dict_diff(ckpt.get("recipe") or {}, recipe_to_dict(recipe))
        raise RunError(
            f"{run_dir / BEST}: checkpoint was trained with another recipe "
            f"(differs at {', '.join(differing[:5])})"
        )
    pipeline = Pipeline(recipe, registry, source=str(recipe_path), progress=progress)
    load_model_state(pipeline.model, ckpt, path=str(run_dir / BEST))
    return pipeline, ckpt


def _dict_diff(a, b, prefix=""):
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        path = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out.extend(_dict_diff(a[key], b[key], path + "."))
        elif a.get(key) != b.get(key):
            out.append(path)
    return out


def evaluate_run(run_dir, *, data=None, out=None, registry=None, progress=True, echo=print):
    """Re-score a CSV (default: the run's test split) with a finished run's model."""
    run_dir = Path(run_dir)
    pipeline, ckpt = load_run(run_dir, registry=registry, progress=progress)
    recipe = pipeline.recipe
    csv = Path(data) if data else resolve_csv(recipe.data.test, recipe.data.base_dir)
    split = read_split(csv, recipe.data.base_dir if not data else None)
    if split.labels is None:
        raise DataError(f"{csv}: eval needs labels in every row (use mmcore predict for unlabeled data)")
    out_dir = Path(out) if out else run_dir / "eval" / f"{csv.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    bad_images = BadImages(recipe.data.on_bad_image)
    dataset, split, errors = pipeline.dataset(split)
    if errors:
        bad_images.check({"errors": errors}, "eval")
    trainer = Trainer(
        model=pipeline.model, optimizer=None, scheduler=None, loss_fn=None,
        device=pipeline.device, dtype=pipeline.dtype, bad_images=bad_images,
        progress=progress, channels_last=pipeline.channels_last,
    )
    indices, logits, labels = trainer.predict(pipeline.loader(dataset), "eval")
    decision = ckpt.get("decision") or {"threshold": 0.5, "temperature": 1.0, "description": "0.5 (no decision saved)"}
    summary = {
        "experiment": recipe.experiment,
        "run_dir": str(run_dir),
        "evaluated_csv": str(csv),
        "selected_epoch": ckpt.get("epoch"),
        "data": {"eval": len(split)},
        "skipped_images": bad_images.counts(),
    }
    results, _ = write_evaluation(
        out_dir, split=split, indices=indices, logits=logits, labels=labels,
        decision_info=decision, summary=summary, title=f"mmcore eval — {recipe.experiment} on {csv.name}",
    )
    test = results["test"]["at_threshold"]
    echo(f"evaluated {len(split)} rows of {csv}: AUROC {test['auroc']}, F1 {test['f1']:.4f} at threshold {decision['threshold']:.4f}")
    echo(f"wrote {out_dir}")
    return out_dir
