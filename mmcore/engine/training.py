"""One training run as an object whose whole state round-trips through ``last.ckpt``.

Epoch loop, validation, model selection, early stopping, then the decision (temperature and
threshold on validation) and the test evaluation written into the run directory.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random
import time

import numpy as np
import torch

from mmcore.dist import all_gather_objects, broadcast_tensors_, is_main, world_size
from mmcore.dist import rank as runtime_rank
from mmcore.engine.averaging import WeightEMA, load_soup_state_, soup_state
from mmcore.engine.checkpoint import load_model_state, make_checkpoint, model_state_keys, read_checkpoint, save_checkpoint
from mmcore.engine.distill import start_distillation
from mmcore.engine.inference import predict, sigmoid
from mmcore.engine.loggers import Loggers
from mmcore.engine.loop import Trainer, total_steps
from mmcore.engine.outputs import write_evaluation
from mmcore.engine.parallel import batch_summary, compile_variable_axes, small_batch_warning, training_module
from mmcore.engine.pipeline import Pipeline
from mmcore.engine.policies import BadImages
from mmcore.engine.runtime import describe_precision, precision_name
from mmcore.engine.sampling import EpochBatchSampler, SeededItems, ShardSampler, balanced_weights, derive_seed
from mmcore.engine.selection import Selection
from mmcore.engine.step import prepare_batch
from mmcore.errors import MmcoreError, RunError
from mmcore.evaluation.calibration import fit_temperature
from mmcore.evaluation.metrics import binary_metrics
from mmcore.evaluation.threshold import parse_threshold_rule, tune_threshold
from mmcore.kit.health import first_batch_problems
from mmcore.model.components import build_component
from mmcore.model.trainability import parameter_groups, trainable_summary
from mmcore.plugins.build import reported_failures
from mmcore.recipe import recipe_to_dict
from mmcore.rundir import RunDir, require_same_recipe
from mmcore.store.root import warn


def epoch_metrics(logits, labels, loss_fn, prefix="val"):
    """Validation metrics of one epoch (prefixed), from CPU logits."""
    scores = sigmoid(logits)
    metrics = binary_metrics(scores, labels, 0.5)
    loss = loss_fn(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.float32))
    out = {f"{prefix}_loss": float(loss)}
    for key in ("auroc", "auprc", "accuracy", "f1", "precision", "recall"):
        out[f"{prefix}_{key}"] = metrics.get(key)
    return out


class Interrupted(RunError):
    """SIGINT/SIGTERM: the run stopped after a step and wrote last.ckpt."""

    exit_code = 130


def _label_counts(split):
    labels = split.label_array()
    return int((labels == 0).sum()), int((labels == 1).sum())


def _rng_state():
    """This process's random state: python, numpy, torch and its own CUDA device's generator.

    Only the current device's CUDA state is saved (each process draws on the GPU it runs
    on); a checkpoint that held every GPU's could not be restored on a machine with fewer.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = _cuda_rng_state(state.get("cuda"))
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def _cuda_rng_state(saved):
    """The saved CUDA generator state for the current device, or None.

    Checkpoints written before held a list with every GPU's state (the process's own at its
    device index); one that has none for this device restores the others and leaves this one.
    """
    if not isinstance(saved, (list, tuple)):
        return saved
    index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return saved[index] if index < len(saved) else None


def _gather_rng_states():
    """Every rank's RNG state, in rank order (tensors travel as ``torch.save`` bytes: object
    collectives do not unpickle tensors reliably)."""
    buffer = io.BytesIO()
    torch.save(_rng_state(), buffer)
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in all_gather_objects(buffer.getvalue())]


class TrainingRun:
    """Everything one training run holds; its state round-trips through ``last.ckpt``."""

    def __init__(self, recipe, registry, splits, run_dir, recipe_path, progress, echo, duplicates=None, on_epoch_end=None,
                 *, score_split, open_teacher=None):
        """``on_epoch_end(epoch, metrics)``: called on every rank after each epoch's validation (its
        checkpoints written) with that epoch's validation metrics; returning True stops training
        there and the run finishes with its best epoch so far (``mmcore tune`` prunes with it).

        ``score_split(run_model, split, *, decision, source, progress, desc) -> (positions, logits,
        bad lines)``: how the test split is scored at the end, on every rank (each its share under
        torchrun, every rank getting all of them): the scoring path's
        :func:`mmcore.scoring.run.score_split`, which ``mmcore eval`` scores with too. The caller
        (``mmcore run``) passes it: the engine sits below the scoring path.

        ``open_teacher(path, *, device, registry, source) -> Teacher``: how ``train.distill.teacher`` is
        opened (:func:`mmcore.scoring.teacher.open_teacher`, passed by ``mmcore run`` alike);
        needed only when the recipe distils.
        """
        self.open_teacher = open_teacher
        self.on_epoch_end = on_epoch_end
        self.score_split = score_split
        self.recipe = recipe
        self.registry = registry
        #: the run directory (:class:`~mmcore.rundir.RunDir`): its checkpoints are ``run_dir.best`` and ``run_dir.last``
        self.run_dir = RunDir(run_dir)
        self.recipe_path = recipe_path
        self.progress = progress
        self.echo = echo
        self.trainer = None
        self.stop_signal = None
        self.duplicates = duplicates or {}
        self.main = is_main()
        self.recipe_dict = recipe_to_dict(recipe)
        # progress through training
        self.epoch = 1
        self.skip_batches = 0
        self.loss_totals = (0.0, 0)
        self.history = []
        self.best_state = None  # rank 0: the selected epoch's model state, kept in memory
        #: the best epoch, its weights (raw or EMA), patience and the soup pool
        self.selection = Selection(recipe.train.early_stopping.metric, soup=recipe.train.soup, soup_k=recipe.train.soup_k)
        self._setup(splits)

    def _setup(self, splits):
        recipe = self.recipe
        pipeline = self.pipeline = Pipeline(recipe, self.registry, source=str(self.recipe_path), progress=self.progress)
        model = pipeline.model
        pipeline.fit_encoders(splits["train"])
        self.bad_images = BadImages(recipe.data.on_bad_image)
        #: the test split, scored at the end by the scoring path (raw rows, float32: what ``mmcore eval`` computes)
        self.test_split = splits["test"]
        self.datasets = {}
        for name in ("train", "val"):
            dataset, split, errors = pipeline.dataset(splits[name], train=name == "train")
            if errors:
                self.bad_images.check({"errors": errors}, name)
            self.datasets[name] = (dataset, split)
        train_dataset, train_split = self.datasets["train"]
        source = str(self.recipe_path)
        self.loss_fn = build_component(self.registry, "loss", recipe.loss, _label_counts(train_split), source=source)
        #: train.distill: the teacher's logits ride in the training batches (transfer rows after the training rows)
        self.distillation = None
        if recipe.train.distill is not None:
            self.distillation, train_dataset = start_distillation(
                recipe, pipeline, self.datasets, self.loss_fn, open_teacher=self.open_teacher, registry=self.registry,
                bad_images=self.bad_images, source=source, echo=self.echo if self.main else None)
        weights = balanced_weights(train_split.label_array()) if recipe.train.balanced_sampler else None
        rank, world = runtime_rank(), world_size()
        if recipe.train.batch_size % world:
            raise RunError(
                f"{self.recipe_path}: train.batch_size: the global batch ({recipe.train.batch_size}) must be "
                f"divisible by the number of processes ({world})"
            )
        small = small_batch_warning(recipe.train.batch_size, world, pipeline.device)
        if small and self.main:
            warn(small)
        # random augmentation seeded per sample (by its place in the epoch): a resumed epoch can
        # start at the sampler and still see the very augmentations an uninterrupted one would
        seeded = train_dataset.augmentation is not None
        self.batch_sampler = EpochBatchSampler(
            len(train_dataset), recipe.train.batch_size, seed=recipe.seed, weights=weights,
            rank=rank, world_size=world, seeded=seeded, drop_last=recipe.train.drop_last,
        )
        self.train_loader = pipeline.loader(
            SeededItems(train_dataset) if seeded else train_dataset, train=True, batch_sampler=self.batch_sampler
        )
        self.val_loader = pipeline.loader(
            self.datasets["val"][0], sampler=ShardSampler(len(self.datasets["val"][0]), rank, world)
        )
        if self.main:  # a dead encoder (features near zero or constant), or a plugin's bug, is said before training
            prepare = functools.partial(prepare_batch, device=pipeline.device, channels_last=pipeline.channels_last)
            with reported_failures(model.plugin_parts(), "on the first batch"):
                for line in first_batch_problems(model, self.datasets["val"][0], self.val_loader.collate_fn, prepare=prepare):
                    self.echo(line)
        groups = parameter_groups(
            model,
            head_lr=recipe.train.learning_rate,
            backbone_lr=recipe.train.backbone_lr,
            lora_lr=recipe.train.lora_lr,
            weight_decay=recipe.train.weight_decay,
            layer_decay=recipe.train.layer_decay,
        )
        self.optimizer = torch.optim.AdamW(groups)
        self.ema = WeightEMA(model, recipe.train.ema.decay) if recipe.train.ema is not None else None
        steps = total_steps(len(self.train_loader), recipe.train.grad_accum_steps, recipe.train.epochs)
        self.scheduler = build_component(self.registry, "scheduler", recipe.scheduler, self.optimizer, steps, source=source)
        self.writer = Loggers(recipe, self.run_dir.path, self.recipe_dict) if self.main else None
        # every split's features are cached by now: what only computed them leaves the GPU
        offloaded = pipeline.offload_cached_encoders()
        train_model = training_module(model, recipe.train, device=pipeline.device, world=world, offloaded=offloaded,
                                      variable_axes=compile_variable_axes(model, pipeline.cache_vision))
        if self.main and pipeline.device.type == "cuda":
            self.echo(describe_precision(recipe.train.precision, pipeline.dtype, pipeline.device))
        distill = self.distillation
        self.trainer = Trainer(
            model=train_model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loss_fn=self.loss_fn,
            device=pipeline.device,
            dtype=pipeline.dtype,
            grad_accum_steps=recipe.train.grad_accum_steps,
            grad_clip=recipe.train.grad_clip,
            on_nan=recipe.train.on_nan,
            bad_images=self.bad_images,
            writer=self.writer,
            progress=self.progress,
            channels_last=pipeline.channels_last,
            on_step=self._on_step,
            last_checkpoint=self.run_dir.last,
            ema=self.ema,
            distill=distill.loss if distill is not None else None,
            online_teacher=distill.online_logits if distill is not None and distill.config.online else None,
        )

    # -- state ------------------------------------------------------------------------------

    def state_dict(self, *, epoch_complete, rng_ranks=None):
        trainer = self.trainer
        return make_checkpoint(
            self.pipeline.model,
            recipe_dict=self.recipe_dict,
            epoch=self.epoch,
            metrics=self.selection.best_metrics,
            extra={
                "kind": "last",
                "epoch_complete": epoch_complete,
                "batches_done": 0 if epoch_complete else trainer.batches_done,
                "loss_totals": list(trainer.loss_totals) if not epoch_complete else [0.0, 0],
                "global_step": trainer.global_step,
                "skipped_nan_steps": trainer.skipped_nan_steps,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                **({"grad_scaler": trainer.step.scaler.state_dict()} if trainer.step.scaler.is_enabled() else {}),
                "rng": _rng_state(),
                # every rank's own stream (ranks > 0 draw their own dropout masks)
                **({"rng_ranks": rng_ranks} if rng_ranks and len(rng_ranks) > 1 else {}),
                **self.selection.state_dict(),
                "history": self.history,
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                **(self.distillation.state_dict() if self.distillation is not None else {}),
            },
        )

    def save_last(self, *, epoch_complete):
        """Write last.ckpt (rank 0); called on every rank, as it reads the loop's device state
        (a bad loss raises here, before anything is written) and gathers every rank's RNG."""
        self.trainer.settle()
        rng_ranks = _gather_rng_states() if world_size() > 1 else None
        if self.main:
            save_checkpoint(self.run_dir.last, self.state_dict(epoch_complete=epoch_complete, rng_ranks=rng_ranks))

    def load_state(self, state):
        require_same_recipe(state.get("recipe"), self.recipe_dict, where=self.run_dir.last, said="saved with another recipe",
                            added_ok=True)
        if self.distillation is not None:
            self.distillation.check_resume(state, self.run_dir.last)
        load_model_state(self.pipeline.model, state, path=str(self.run_dir.last))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        trainer = self.trainer
        if trainer.step.scaler.is_enabled() and "grad_scaler" in state:  # fp16: the loss scale it had reached
            trainer.step.scaler.load_state_dict(state["grad_scaler"])
        trainer.global_step = state["global_step"]
        trainer.skipped_nan_steps = state["skipped_nan_steps"]
        self.selection.load_state_dict(state)
        self.history = list(state["history"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if state["epoch_complete"]:
            self.epoch, self.skip_batches, self.loss_totals = state["epoch"] + 1, 0, (0.0, 0)
        else:
            self.epoch, self.skip_batches = state["epoch"], state["batches_done"]
            self.loss_totals = tuple(state["loss_totals"])
        rng_ranks = state.get("rng_ranks") or []
        rank = runtime_rank()
        _set_rng_state(rng_ranks[rank] if len(rng_ranks) == world_size() else state["rng"])

    def predict(self, loader, split_name):
        """Logits of a split with the model as it is now (no optimizer involved)."""
        pipeline = self.pipeline
        return predict(
            pipeline.model, loader, device=pipeline.device, dtype=pipeline.dtype, bad_images=self.bad_images,
            split_name=split_name, progress=self.progress, channels_last=pipeline.channels_last,
        )

    def _load_best(self):
        """The selected epoch's weights on every rank: rank 0 holds them (in memory, or in
        checkpoint_best.ckpt after a resume) and broadcasts them; no other rank reads a file,
        so ranks need no shared output directory."""
        path, model = self.run_dir.best, self.pipeline.model
        if self.main:
            ckpt = {"model": self.best_state} if self.best_state is not None else read_checkpoint(path)
            load_model_state(model, ckpt, path=str(path))
        if world_size() > 1:
            # in place, tensor by tensor on the model's device: what a checkpoint carries
            carried = set(model_state_keys(model))
            broadcast_tensors_([value for key, value in model.state_dict().items() if key in carried])

    def _on_step(self, epoch, batches_done):
        every = self.recipe.train.checkpoint_every_steps
        if every and self.trainer.global_step % every == 0:
            self.save_last(epoch_complete=False)

    # -- training ---------------------------------------------------------------------------

    def fit(self):
        try:
            self._train_epochs()
        finally:
            self.trainer.release_data_parallel()
        if self.selection.best_epoch == 0:
            raise RunError(f"{self.selection.metric} was never computed (validation has one class?); no checkpoint selected")
        if self.selection.makes_soup:
            self._make_soup()
        return self.finish()

    def _train_epochs(self):
        """Epochs until ``train.epochs``, early stopping, a stop request or ``on_epoch_end``."""
        recipe, trainer, selection = self.recipe, self.trainer, self.selection
        metric, patience = selection.metric, recipe.train.early_stopping.patience
        while self.epoch <= recipe.train.epochs:
            if selection.patience_spent(patience):
                break
            epoch = self.epoch
            epoch_start = time.perf_counter()
            self.batch_sampler.set_epoch(epoch, start=self.skip_batches)  # a resumed epoch skips what it did
            self.train_loader.generator.manual_seed(derive_seed(recipe.seed, epoch, runtime_rank()))  # worker seeds
            train_loss, completed = trainer.train_epoch(
                self.train_loader, epoch, recipe.train.epochs, skip_batches=self.skip_batches, totals=self.loss_totals
            )
            self.skip_batches, self.loss_totals = 0, (0.0, 0)
            if not completed:
                self.save_last(epoch_complete=False)
                stop = Interrupted(
                    f"stopped at epoch {epoch}, step {trainer.global_step}; state saved in {self.run_dir.last}. "
                    f"Resume with: mmcore run --resume {self.run_dir}"
                )
                stop.exit_code = 128 + int(self.stop_signal or 2)
                raise stop
            candidates = self._validate()
            metrics = candidates[0][1]
            row = {"epoch": epoch, "train_loss": train_loss, **metrics}
            if self.ema is not None:
                row.update({f"ema_{key}": value for key, value in candidates[1][1].items()})
            row["epoch_time_s"] = time.perf_counter() - epoch_start
            self.history.append(row)
            self._log_epoch(train_loss, epoch, candidates)
            weights, metrics, improved = selection.offer(epoch, candidates, state_of=self._soup_state)
            if improved and self.main:
                with self._weights(weights):
                    best = make_checkpoint(self.pipeline.model, recipe_dict=self.recipe_dict, epoch=epoch, metrics=metrics)
                save_checkpoint(self.run_dir.best, best)
                self.best_state = best["model"]
            if self.progress:
                shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                rate = f" samples/s={trainer.samples_per_s:.1f}" if trainer.samples_per_s is not None else ""
                self.echo(f"epoch {epoch}: train_loss={train_loss:.4f} {shown}{rate}{' *' if improved else ''}")
            self.save_last(epoch_complete=True)
            self.epoch += 1
            if self.on_epoch_end is not None and self.on_epoch_end(epoch, dict(metrics)):
                self.echo(f"stopped after epoch {epoch} by on_epoch_end (best epoch {selection.best_epoch})")
                break
            if selection.patience_spent(patience):
                self.echo(f"early stopping: {metric} has not improved for {patience} epochs (best epoch {selection.best_epoch})")
                break

    def _validate(self):
        """This epoch's candidates, ``[("raw", metrics)]`` and, with an EMA, ``("ema", metrics)`` validated alike."""
        _, logits, labels = self.predict(self.val_loader, "val")
        metrics = epoch_metrics(logits, labels, self.loss_fn)
        metric = self.selection.metric
        if metric not in metrics:
            raise MmcoreError(
                f"{self.recipe_path}: train.early_stopping.metric: unknown metric {metric!r} (one of {', '.join(metrics)})"
            )
        candidates = [("raw", metrics)]
        if self.ema is not None:
            with self.ema.applied():
                _, logits, labels = self.predict(self.val_loader, "val")
            candidates.append(("ema", epoch_metrics(logits, labels, self.loss_fn)))
        return candidates

    def _log_epoch(self, train_loss, epoch, candidates):
        """The epoch's validation on the global step, as train/*, so the curves overlay (rank 0)."""
        if self.writer is None:
            return
        step = self.trainer.global_step
        for prefix, (_, metrics) in zip(("val", "val_ema"), candidates):
            for key, value in metrics.items():
                if value is not None:
                    self.writer.add_scalar(f"{prefix}/{key.removeprefix('val_')}", value, step)
        self.writer.add_scalar("train/epoch_loss", train_loss, step)
        self.writer.add_scalar("epoch", epoch, step)
        self.writer.flush()

    # -- EMA and soups ----------------------------------------------------------------------

    def _weights(self, kind):
        """The model holds ``kind`` ("raw" or "ema") weights inside the block."""
        return self.ema.applied() if kind == "ema" else contextlib.nullcontext()

    def _soup_state(self, kind):
        """The model's soup state (trainable weights and batch-norm statistics, on the CPU) under ``kind`` weights."""
        with self._weights(kind):
            return soup_state(self.pipeline.model)

    def _make_soup(self):
        """The soup of the pooled epochs becomes the selected model (and ``checkpoint_best.ckpt``)."""
        model = self.pipeline.model

        def validate(state):
            load_soup_state_(model, state)
            _, logits, labels = self.predict(self.val_loader, "val")
            return epoch_metrics(logits, labels, self.loss_fn)

        soup, metrics = self.selection.make_soup(validate)
        load_soup_state_(model, soup)
        if self.main:
            best = make_checkpoint(model, recipe_dict=self.recipe_dict, epoch=self.selection.best_epoch, metrics=metrics,
                                   extra={"soup": self.selection.soup})
            save_checkpoint(self.run_dir.best, best)
            self.best_state = best["model"]

    def finish(self):
        """Load the best epoch, fit the decision on validation, evaluate the test split, write outputs."""
        recipe, trainer, model = self.recipe, self.trainer, self.pipeline.model
        self._load_best()
        val_positions, val_logits, val_labels = self.predict(self.val_loader, "val")
        decision = fit_decision(recipe, val_logits, val_labels)
        test_indices, test_logits = self.score_test(decision)
        test_labels = self.test_split.label_array()[test_indices]
        if not self.main:
            return {}
        selection = self.selection
        summary = {
            "experiment": recipe.experiment,
            "run_dir": str(self.run_dir),
            "selected_epoch": selection.best_epoch,
            "selection_metric": selection.metric,
            "selected_weights": selection.selected_weights,
            **({"soup": selection.soup} if selection.soup is not None else {}),
            "epochs_trained": len(self.history),
            "val": selection.best_metrics,
            "history": self.history,
            "data": {
                # cached features drop bad images from the split up front; online, they are skipped per batch
                "train": len(self.datasets["train"][1])
                - (0 if self.pipeline.cache_vision else self.bad_images.counts().get("train", 0)),
                "val": len(val_labels),
                "test": len(test_indices),
            },
            "duplicates": self.duplicates,
            "skipped_images": self.bad_images.counts(),
            "skipped_nan_steps": trainer.skipped_nan_steps,
            "trainable_parameters": trainable_summary(model),
            "feature_cache": self.pipeline.cache_summary(),
            "precision": precision_name(self.pipeline.dtype),
            "train_batch": batch_summary(recipe.train.batch_size, world_size(), recipe.train.drop_last),
            **({"distillation": self.distillation.summary(
                self.distillation.agreement(val_positions, val_logits, val_labels, decision))}
               if self.distillation is not None else {}),
        }
        results, _ = write_evaluation(
            self.run_dir,
            split=self.test_split,
            indices=test_indices,
            logits=test_logits,
            labels=test_labels,
            decision_info=decision,
            summary=summary,
            history=self.history,
            title=f"mmcore — {recipe.experiment}",
            # the explanations run the model once more over the test rows: raw rows, as they were scored
            pipeline=Pipeline(recipe, self.registry, progress=self.progress, one_pass=True, use_cache=False,
                              built=self.pipeline.built),
        )
        ckpt = make_checkpoint(
            model, recipe_dict=self.recipe_dict, epoch=selection.best_epoch, metrics=selection.best_metrics,
            extra={"decision": decision, **({"soup": selection.soup} if selection.soup is not None else {})},
        )
        save_checkpoint(self.run_dir.best, ckpt)
        if self.writer is not None:
            _log_hparams(self.writer, self.recipe_dict, results)
            _log_pr_curve(self.writer, test_logits, test_labels, selection.best_epoch)
            self.writer.log_results(results)
            self.writer.close()
        return results

    def score_test(self, decision):
        """The test split's ``(positions, logits)``, scored as ``mmcore eval`` scores it: by the
        scoring path (``score_split``, see :class:`TrainingRun`), the selected model in float32 from the
        raw rows, never through the feature cache. Unreadable images follow ``data.on_bad_image``."""
        positions, logits, bad = self.score_split(self.pipeline.built, self.test_split, decision=decision,
                                                  source=self.run_dir, progress=self.progress, desc="test")
        self.bad_images.check({"errors": list(bad)}, "test")
        return positions, logits


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


def flat_hparams(recipe_dict, prefix=""):
    """Every recipe key as a dotted name (``train.lora.enabled``) with a value TensorBoard's
    hparams take: numbers, strings and booleans as they are, anything else (lists, None) as text."""
    flat = {}
    for key, value in recipe_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = repr(value) if value is None else str(value)
    return flat


def _log_hparams(writer, recipe_dict, results):
    """The whole recipe as hparams, with the final test metrics (at the tuned threshold)."""
    test = (results.get("test") or {}).get("at_threshold") or {}
    metrics = {f"hparam/test_{k}": v for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics:
        writer.add_hparams(flat_hparams(recipe_dict), metrics)


def _log_pr_curve(writer, logits, labels, step):
    if len(labels):
        writer.add_pr_curve("test/pr_curve", torch.as_tensor(labels).int(), torch.as_tensor(sigmoid(logits)), step)
