"""An ensemble directory as a :class:`~mmcore.scoring.base.Scorer`: a scorer of weighted member scorers.

How it composes (the protocol's combination point, :mod:`mmcore.scoring.base`): ``load_image``
decodes once, at the largest size a member reads; ``preprocess`` returns one item per member;
``logits`` scores the batch with every member of non-zero weight and returns the ensemble's
logit, ``combined_logit(sum_m w_m * sigmoid(logit_m))`` (:mod:`mmcore.evaluation.ensemble`):
the weights combine the members' *probabilities* (raw, before each member's own temperature),
never their logits. Everything downstream (the ensemble's own temperature and threshold,
metrics, reports, ``predictions.csv``) treats that logit as a run's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcore.engine.inference import sigmoid
from mmcore.errors import RunError
from mmcore.evaluation.ensemble import combine_scores, combined_logit
from mmcore.scoring.base import Scorer
from mmcore.scoring.ensemble_dir import ENSEMBLE_FILE, read_ensemble



class EnsembleScorer(Scorer):
    """Members (scorers) and their weights -> one scorer.

    ``EnsembleScorer(dir, device=...)`` reads an ensemble directory (:func:`read_ensemble`: bounded,
    checked, members' checksums verified) and loads each member of non-zero weight as a
    :class:`~mmcore.scoring.run.RunScorer`; :meth:`from_members` combines scorers already in
    memory (``mmcore ensemble`` while it selects, the export parity gate). Every member must read
    the same modality (one line naming the first that does not).
    """

    kind = "ensemble"

    def __init__(self, folder, *, registry=None, device="auto", verify=None, progress=False):
        from mmcore.scoring.run import RunScorer

        ensemble = read_ensemble(folder, verify=verify is not False)
        scoring = ensemble.scoring
        members = [RunScorer(m.path, registry=registry, device=device, progress=progress) for m in scoring]
        self._use(members, [m.weight for m in scoring], ensemble.decision, source=Path(folder),
                  names=[m.dir for m in scoring])
        self.ensemble = ensemble

    @classmethod
    def from_members(cls, members, weights, *, decision, source, names=None):
        """A scorer over ``members`` (scorers) with ``weights`` (>= 0, summing to 1; members of
        weight 0 are dropped here) and the ensemble's ``decision``."""
        scorer = cls.__new__(cls)
        kept = [(m, float(w), n) for m, w, n in zip(members, weights, names or [str(m.source) for m in members]) if w > 0]
        scorer._use([m for m, _, _ in kept], [w for _, w, _ in kept], decision, source=Path(source),
                    names=[n for _, _, n in kept])
        scorer.ensemble = None
        return scorer

    def _use(self, members, weights, decision, *, source, names):
        from mmcore.scoring.base import DEFAULT_DECISION

        if not members:
            raise RunError(f"{source}: the ensemble has no member of non-zero weight")
        first = members[0]
        for name, member in zip(names[1:], members[1:]):
            if member.modality != first.modality:
                raise RunError(f"{source}: member {name} reads {member.modality}, but {names[0]} reads "
                               f"{first.modality}; an ensemble's members read the same inputs")
        self.members = tuple(members)
        total = float(sum(weights))
        self.weights = np.asarray([w / total for w in weights], dtype=np.float64)  # dropping zeros keeps the sum
        self.member_names = tuple(names)
        self.source = Path(source)
        self.recipe_data = first.recipe_data
        self.decision = {**DEFAULT_DECISION, **(decision or {})}
        self.preprocessing = first.preprocessing

    # -- what the members read -----------------------------------------------------------

    @property
    def recipe(self):
        """The first member's structured recipe (its data splits are the ensemble's)."""
        return self.members[0].run_model.recipe

    @property
    def device_name(self):
        return self.members[0].device_name

    @property
    def providers(self):
        return self.members[0].providers

    def load_image(self, source, *, max_pixels=None):
        """Decoded once, at the largest size a member reads (each member's preprocessing resizes)."""
        sizes = [m.preprocessing.target_size for m in self.members if m.preprocessing is not None]
        if not sizes:
            return super().load_image(source, max_pixels=max_pixels)
        largest = max(sizes, key=lambda size: (size or (0, 0))[0] * (size or (0, 0))[1])
        from mmcore.data.images import load_rgb

        if isinstance(source, (bytes, bytearray, memoryview)):
            import io

            source = io.BytesIO(source)
        return load_rgb(source, target_size=largest, max_pixels=max_pixels or self.max_image_pixels,
                        formats=self.image_formats)

    def preprocess(self, image):
        """One item per member (the image decoded once)."""
        return tuple(member.preprocess(image) for member in self.members)

    def member_logits(self, vision_items, texts):
        """Each member's logits of the batch: float64 [members, B]."""
        rows = []
        for index, member in enumerate(self.members):
            items = [item[index] for item in vision_items] if member.uses_vision else None
            rows.append(np.asarray(member.logits(items, texts if member.uses_text else None), dtype=np.float64))
        return np.stack(rows)

    def logits(self, vision_items, texts):
        """``combined_logit(sum_m w_m * sigmoid(logit_m))``: float64 [B]."""
        return combine_member_logits(self.member_logits(vision_items, texts), self.weights)

    # -- what it is ----------------------------------------------------------------------

    def identity_file(self):
        """``ensemble.json``, which holds each member's checkpoint sha256."""
        return self.source / ENSEMBLE_FILE

    def metadata(self):
        """A run's metadata (from the first member's recipe) plus the members and their weights."""
        data = super().metadata()
        data["members"] = [{"dir": name, "weight": float(w), "experiment": m.recipe_data.get("experiment")}
                           for name, w, m in zip(self.member_names, self.weights, self.members)]
        return data


def combine_member_logits(member_logits, weights):
    """Members' logits [M, B] and weights [M] -> the ensemble's logit [B] (weighted mean of probabilities)."""
    return combined_logit(combine_scores([sigmoid(row) for row in member_logits], weights))
