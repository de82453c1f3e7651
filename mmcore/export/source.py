"""What a bundle is made of, whatever made it: :class:`ExportSource` (a run's model, or an ensemble's
members), which :func:`mmcore.commands.export.export_source` writes, gates and renames into place."""

from __future__ import annotations

from pathlib import Path

import attrs


@attrs.frozen(kw_only=True)
class ExportSource:
    """What the bundle is made of: a run's model (:func:`mmcore.commands.export.run_source`) or an ensemble's members
    (:func:`mmcore.export.ensemble_graph.ensemble_source`), ready for
    :func:`mmcore.commands.export.export_source`."""

    #: the run (or ensemble) directory
    path: Path
    #: the structured recipe whose splits, preprocessing and modality the bundle carries
    recipe: object
    registry: object
    #: the classifier whose preprocessing and text encoder give the graph's inputs
    model: object
    #: every weight the graph holds (bundle size, ``--safetensors``)
    weights: object
    decision: dict
    #: the PyTorch scorer in float32 the gate compares the bundle with
    scorer: object
    #: the same at the precision it trained in (None: float32 already)
    trained_scorer: object = None
    trained_precision: str = "fp32"
    selected_epoch: object = None
    #: ``make_graph(vision_names, text_plan) -> module`` with ``input_names``/``text_names``/``vision_names``
    make_graph: object
    #: ``(fmt, exc) -> one line`` naming what could not be traced
    graph_failure: object
    #: more keys of manifest.json
    manifest_extra: dict = attrs.Factory(dict)
