"""A finished run directory -> its model again: the recipe it saved, the weights of its selected
epoch, checked against each other (``eval``, ``predict``, ``export`` and ``serve`` of a run).
"""

from __future__ import annotations

import attrs

from mmcore.engine.build import build_model
from mmcore.engine.checkpoint import load_model_state, read_checkpoint
from mmcore.engine.runtime import torch_device
from mmcore.model.weights import require_weights
from mmcore.recipe import recipe_to_dict
from mmcore.rundir import RunDir, require_same_recipe


def open_run(run_dir, *, echo=print):
    """A run directory that can be scored: finished, or live (then its last completed checkpoint, said in one line)."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    note = run_dir.require_scorable()
    if note:
        echo(note)
    return run_dir


def load_run(run_dir, *, registry=None, progress=True, echo=print, device=None, fp32=False):
    """Rebuild a run's model from its recipe and best checkpoint -> ``(run_model, ckpt)``.

    ``run_model`` is a :class:`~mmcore.engine.build.RunModel` (the classifier with the selected
    epoch's weights, on its device); ``ckpt`` the checkpoint (its ``decision``, ``epoch``, ...).
    ``run_dir``: a path (checked here) or a :class:`RunDir` already checked with :func:`open_run`.
    ``device`` (``auto``/``cpu``/``cuda[:N]``) replaces the recipe's ``train.device`` for this scoring;
    ``fp32=True`` scores in float32 as a bundle computes: ``train.precision = "fp32"`` and no TF32 (both
    after the checkpoint's recipe check, which compares the recipe as trained).
    """
    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    if not isinstance(run_dir, RunDir):
        run_dir = open_run(run_dir, echo=echo)
    recipe = run_dir.load_recipe(registry)
    ckpt = read_checkpoint(run_dir.best)
    require_same_recipe(
        ckpt.get("recipe"), recipe_to_dict(recipe), where=run_dir.best, said="checkpoint was trained with another recipe",
        added_ok=True,
    )
    require_weights(recipe, registry, source=str(run_dir.recipe_file))  # frozen pretrained encoders reload from their ids
    train = recipe.train
    if device is not None:
        train = attrs.evolve(train, device=str(torch_device(device)))  # CUDA asked for and missing: one line naming --device
    if fp32:  # no autocast, and no TF32 matmuls on a GPU either
        train = attrs.evolve(train, precision="fp32", tf32=False)
    recipe = attrs.evolve(recipe, train=train)
    run_model = build_model(recipe, registry, source=str(run_dir.recipe_file), progress=progress)
    load_model_state(run_model.model, ckpt, path=str(run_dir.best))
    return run_model, ckpt
