"""An ensemble as one graph: the members' inputs (shared) -> every member's logit -> the ensemble's logit.

The graph computes what :class:`~mmcore.scoring.ensemble.EnsembleScorer` computes on the host:
``p = sum_m w_m * sigmoid(logit_m)``, ``p`` clipped to ``[COMBINED_EPS, 1 - COMBINED_EPS]`` (exact
in float32), ``logit = log(p) - log1p(-p)``. An encoder that several members share — the same
registered component with the same params and the same weights (a frozen pretrained encoder;
a fine-tuned one differs per member) — runs once and hands its output to each member's pooling,
fusion and head, so a 3-member ensemble of frozen-encoder recipes costs one encoder pass.

Members must read the same graph inputs: the same image preprocessing and the same text encoder
tokenizer/featurizer (:func:`check_shared_inputs`), or export is refused in one line naming two
members and what differs. :func:`ensemble_source` makes an ensemble directory what
``mmcore export`` writes (:func:`mmcore.commands.export.export_source`): one bundle, one parity
gate (the :class:`~mmcore.scoring.ensemble.EnsembleScorer` in float32 against the graph).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from mmcore.engine.restore import load_run
from mmcore.evaluation.ensemble import COMBINED_EPS
from mmcore.export import bundle as B
from mmcore.export.onnx import ExportUnsupported, TextGraph, plan_text
from mmcore.export.source import ExportSource
from mmcore.model.classifier import device_pixels
from mmcore.recipe import recipe_to_dict
from mmcore.scoring.ensemble import EnsembleScorer
from mmcore.scoring.ensemble_dir import read_ensemble
from mmcore.scoring.run import RunScorer


def encoder_fingerprint(name, params, module):
    """``sha256`` of an encoder's registry name, params and every tensor of its state dict: two
    encoders with equal fingerprints compute the same function, so the graph runs one of them."""
    digest = hashlib.sha256(json.dumps([name, params], sort_keys=True, default=str).encode())
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def share_groups(fingerprints):
    """Member index -> group index, groups in order of first appearance (equal fingerprints, one group)."""
    groups, assignment = {}, []
    for fingerprint in fingerprints:
        assignment.append(groups.setdefault(fingerprint, len(groups)))
    return assignment


def check_shared_inputs(names, recipes, describe_vision):
    """One :class:`ExportUnsupported` line when two members would need different graph inputs.

    ``recipes``: each member's recipe as plain data; ``describe_vision(i)``: member ``i``'s
    preprocessing as data (None when it reads no image).
    """
    first = describe_vision(0)
    for i in range(1, len(names)):
        if describe_vision(i) != first:
            raise ExportUnsupported(f"members {names[0]} and {names[i]}: their image preprocessing differs "
                                    f"(vision: {recipes[0].get('vision', {}).get('name')!r} and "
                                    f"{recipes[i].get('vision', {}).get('name')!r}); one graph has one set of inputs")
        text0, text_i = recipes[0].get("text") or {}, recipes[i].get("text") or {}
        if (recipes[0].get("train") or {}).get("modality") != "vision_only" and text0 != text_i:
            raise ExportUnsupported(f"members {names[0]} and {names[i]}: their text encoders differ "
                                    f"({text0.get('name')!r} and {text_i.get('name')!r}); one graph has one set of "
                                    f"text inputs")


class EnsembleGraph(nn.Module):
    """Member classifiers and weights -> one logit per row (flat tensor inputs, as ``FusedModel``'s).

    ``vision_groups`` / ``text_groups``: member -> the index of the encoder (or text graph) it
    uses, from :func:`share_groups`; each group's encoder runs once per batch.
    """

    def __init__(self, classifiers, weights, vision_names, text_plan, *, vision_groups, text_groups):
        super().__init__()
        self.members = nn.ModuleList(classifiers)
        self.register_buffer("weights", torch.tensor([float(w) for w in weights], dtype=torch.float32))
        self.vision_names = tuple(vision_names)
        first = classifiers[0]
        self.text_plan = text_plan if first.uses_text else None
        self.text_names = tuple(self.text_plan.graph_names) if self.text_plan else ()
        self.vision_groups = list(vision_groups)
        self.text_groups = list(text_groups)
        # the first member of each group lends its encoder (they are equal by fingerprint)
        self.vision_encoders = nn.ModuleList(
            classifiers[self.vision_groups.index(g)].vision for g in range(max(self.vision_groups, default=-1) + 1)
        ) if first.uses_vision else nn.ModuleList()
        self.text_graphs = nn.ModuleList(
            TextGraph(plan_text(classifiers[self.text_groups.index(g)].text) if g else text_plan)
            for g in range(max(self.text_groups, default=-1) + 1)
        ) if self.text_plan else nn.ModuleList()

    @property
    def input_names(self):
        return [*self.vision_names, *self.text_names]

    def forward(self, *inputs):
        """Tensors in the order of :attr:`input_names` -> the ensemble's logit per row."""
        n = len(self.vision_names)
        pixels = dict(zip(self.vision_names, inputs[:n]))
        encoded = [encoder(**device_pixels(pixels, encoder.preprocessing)) for encoder in self.vision_encoders]
        texts = [graph(*inputs[n:]) for graph in self.text_graphs]
        probability = None
        for m, member in enumerate(self.members):
            batch = {}
            if self.vision_encoders:
                out = encoded[self.vision_groups[m]]
                batch["vision_tokens"], batch["vision_mask"] = out.tokens, out.mask
            if self.text_graphs:
                batch["text_feature"] = texts[self.text_groups[m]]
            term = self.weights[m] * torch.sigmoid(member(batch).logit.float().reshape(-1))
            probability = term if probability is None else probability + term
        p = probability.clamp(COMBINED_EPS, 1.0 - COMBINED_EPS)
        return torch.log(p) - torch.log1p(-p)


def ensemble_source(ensemble_dir, *, registry=None, progress=True):
    """The ensemble directory as an :class:`~mmcore.export.source.ExportSource` (members loaded in
    float32, their shared inputs checked, their shared encoders found)."""
    ensemble = read_ensemble(ensemble_dir)
    members = ensemble.scoring
    loaded = [load_run(m.path, registry=registry, progress=progress, fp32=True) for m in members]
    run_models = [run_model for run_model, _ in loaded]
    registry = run_models[0].registry
    names = [m.dir for m in members]
    classifiers = [run_model.model for run_model in run_models]
    recipes = [recipe_to_dict(run_model.recipe) for run_model in run_models]

    def describe_vision(i):
        model = classifiers[i]
        if not model.uses_vision:
            return None
        return B.describe_preprocessing(model.vision.preprocessing, registry, component=run_models[i].recipe.vision.name)

    check_shared_inputs(names, recipes, describe_vision)
    scorers = [RunScorer.from_model(run_model, decision=ckpt.get("decision"), source=m.path)
               for (run_model, ckpt), m in zip(loaded, members)]
    scorer = EnsembleScorer.from_members(scorers, [m.weight for m in members], decision=ensemble.decision,
                                         source=ensemble.path, names=names)
    first = classifiers[0]
    vision_groups = share_groups(
        [encoder_fingerprint(r.get("vision", {}).get("name"), r.get("vision", {}).get("params"), c.vision)
         for r, c in zip(recipes, classifiers)]) if first.uses_vision else []
    text_groups = share_groups(
        [encoder_fingerprint(r.get("text", {}).get("name"), r.get("text", {}).get("params"), c.text)
         for r, c in zip(recipes, classifiers)]) if first.uses_text else []

    def make_graph(vision_names, plan):
        return EnsembleGraph(classifiers, scorer.weights, vision_names, plan, vision_groups=vision_groups,
                             text_groups=text_groups)

    def graph_failure(fmt, exc):
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        other = "torchscript" if fmt == "onnx" else "onnx"
        return f"{ensemble.path}: the ensemble's graph cannot be exported as {fmt} ({type(exc).__name__}: {reason}); try --format {other}"

    shared = {kind: _groups(assignment) for kind, assignment in (("vision", vision_groups), ("text", text_groups))
              if assignment}
    return ExportSource(
        path=ensemble.path, recipe=run_models[0].recipe, registry=registry, model=first,
        weights=nn.ModuleList(classifiers), decision=ensemble.decision, scorer=scorer,
        make_graph=make_graph, graph_failure=graph_failure,
        manifest_extra={"ensemble": {
            "members": [{"dir": name, "weight": float(w), "experiment": r.get("experiment") or ""}
                        for name, w, r in zip(names, scorer.weights, recipes)],
            "shared_encoders": shared,
        }},
    )


def _groups(assignment):
    """Member -> group index as lists of the members of each group."""
    return [[m for m, g in enumerate(assignment) if g == group] for group in range(max(assignment) + 1)]

