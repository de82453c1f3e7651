"""A run's PyTorch model as a :class:`~mmcore.scoring.base.Scorer`: the classifier with its selected
epoch's weights, scoring raw rows in float32 (no autocast, no TF32, no feature cache): what the
run's bundle computes, so a run and its bundle score alike.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from mmcore.engine.restore import load_run
from mmcore.engine.runtime import autocast, exact_float32
from mmcore.engine.step import prepare_batch
from mmcore.recipe import recipe_to_dict
from mmcore.rundir import RunDir
from mmcore.scoring.base import DEFAULT_DECISION, Scorer


class RunScorer(Scorer):
    """A run directory scored with its PyTorch model, from raw images, in float32.

    ``RunScorer(run_dir, device=...)`` loads the run (:func:`mmcore.engine.restore.load_run`);
    :meth:`from_model` scores a model already in memory (the end of a training run). ``dtype``:
    an autocast dtype instead of float32 (the parity gate measures the run's training precision
    with it). Thread-safe for scoring: the model is in eval mode and only read.
    """

    kind = "run"

    def __init__(self, run_dir, *, registry=None, device="auto", progress=False):
        run_model, ckpt = load_run(run_dir, registry=registry, progress=progress, device=device, fp32=True)
        self._use(run_model, ckpt.get("decision"), source=run_dir, selected_epoch=ckpt.get("epoch"))

    @classmethod
    def from_model(cls, run_model, *, decision=None, source, dtype=None, selected_epoch=None):
        """A scorer over ``run_model`` (a :class:`~mmcore.engine.build.RunModel`) as it is in memory,
        with ``decision`` (None: :data:`~mmcore.scoring.base.DEFAULT_DECISION`); encoders moved off
        the device once their features were cached come back to it."""
        scorer = cls.__new__(cls)
        scorer._use(run_model, decision, source=source, dtype=dtype, selected_epoch=selected_epoch)
        return scorer

    def _use(self, run_model, decision, *, source, dtype=None, selected_epoch=None):
        self.source = Path(source)
        self.selected_epoch = selected_epoch
        self.run_model = run_model
        self.model = run_model.all_on_device()
        self.model.eval()
        self.dtype = dtype
        self.recipe_data = recipe_to_dict(run_model.recipe)
        self.decision = {**DEFAULT_DECISION, **(decision or {})}
        vision = self.model.vision
        self.preprocessing = vision.preprocessing if vision is not None else None

    @property
    def device(self):
        return self.run_model.device

    @property
    def device_name(self):
        return str(self.device)

    @property
    def providers(self):
        """The runtime that scores: torch (where: :attr:`device_name`)."""
        return ["torch"]

    def identity_file(self):
        """The run's ``checkpoint_best.ckpt``."""
        return RunDir(self.source).best

    def _batch(self, vision_items, texts):
        batch = {}
        if self.uses_vision:
            batch["vision"] = self.preprocessing.collate(vision_items)
        if self.uses_text:
            batch["text"] = list(texts)
        return prepare_batch(batch, self.device, self.run_model.channels_last)

    @contextlib.contextmanager
    def _computing(self):
        """No gradients; float32 without TF32, or autocast to :attr:`dtype`."""
        precision = exact_float32(self.device) if self.dtype is None else autocast(self.device, self.dtype)
        with torch.no_grad(), precision:
            yield

    def logits(self, vision_items, texts):
        """The run's own forward (its device and memory format, as training scored)."""
        batch = self._batch(vision_items, texts)
        with self._computing():
            out = self.model(batch).logit
        return out.float().cpu().double().numpy().reshape(-1)

    def embed(self, vision_items, texts):
        """The pooled vision vector and the text vector the fusion (or projection) receives."""
        batch = self._batch(vision_items, texts)
        out = {}
        with self._computing():
            if self.uses_vision:
                out["vision"] = self.model.vision_features(batch)
            if self.uses_text:
                out["text"] = self.model.text_features(batch)
        return {name: value.float().cpu().numpy() for name, value in out.items()}


def score_split(run_model, split, *, decision=None, source, progress=False, desc=None):
    """Every row of ``split`` scored by ``run_model`` (a :class:`~mmcore.engine.build.RunModel`) through
    :func:`~mmcore.scoring.rows.score_rows`, texts as given (the run's OCR stage filled them) ->
    ``(positions, logits, bad)``: the scored rows' positions in order, their logits, and one line per
    row whose image could not be read (left out; the caller applies ``data.on_bad_image``).

    Under torchrun each rank scores its share of the rows and every rank gets all of them.
    """
    scorer = RunScorer.from_model(run_model, decision=decision, source=source)
    return score_split_with(scorer, split, progress=progress, desc=desc)


def score_split_with(scorer, split, *, progress=False, desc=None):
    """Every row of ``split`` scored by ``scorer`` (any :class:`~mmcore.scoring.base.Scorer`), as
    :func:`score_split` does -> ``(positions, logits, bad)``; every rank gets all of them."""
    from mmcore.dist import all_gather_objects, rank, world_size
    from mmcore.scoring.rows import collect, score_rows

    mine = collect(score_rows(scorer, split, fill_text=False, on_bad_image="skip", shard=(rank(), world_size()),
                              progress=progress, desc=desc))
    parts = all_gather_objects((mine.positions, mine.logits, mine.bad))
    positions = np.concatenate([part[0] for part in parts])
    order = np.argsort(positions, kind="stable")
    return positions[order], np.concatenate([part[1] for part in parts])[order], tuple(
        line for part in parts for line in part[2])
