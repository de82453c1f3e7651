"""A distillation teacher for training (``train.distill.teacher``): any scorer, opened by
:func:`~mmcore.scoring.scorers.open_scorer`, handed to the engine as a
:class:`~mmcore.engine.distill.Teacher` (the engine sits below the scoring path)."""

from __future__ import annotations

import functools

from mmcore.engine.distill import Teacher
from mmcore.errors import MmcoreError, RecipeError
from mmcore.scoring.run import score_split_with
from mmcore.scoring.scorers import open_scorer


def open_teacher(path, *, device="auto", registry=None, source="recipe"):
    """The scorer at ``path`` (a run, an ensemble directory or a bundle) as a :class:`Teacher` scoring
    raw rows on ``device``; a path that is none of them is one line naming ``train.distill.teacher``."""
    try:
        scorer = open_scorer(path, registry=registry, device=device)
    except MmcoreError as exc:
        raise RecipeError(f"{source}: train.distill.teacher: {str(exc).splitlines()[0]}") from None
    return Teacher(
        source=str(path), model_version=scorer.model_version, reads_image=scorer.uses_vision,
        reads_text=scorer.uses_text, score=functools.partial(_score, scorer),
        decision=dict(scorer.decision), preprocessing=scorer.preprocessing if scorer.uses_vision else None,
        logits=scorer.logits,
    )


def _score(scorer, split, *, desc):
    return score_split_with(scorer, split, desc=desc)
