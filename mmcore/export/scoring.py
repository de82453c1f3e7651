"""One scoring interface over a bundle (onnxruntime / TorchScript) and a run directory (PyTorch).

``mmcore predict`` on a bundle, the parity gate and ``mmcore serve`` use it: decoded images
are preprocessed one by one (:meth:`Scorer.preprocess`, parallel-safe), then scored as a
batch with their texts (:meth:`Scorer.logits`).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from mmcore.errors import RunError
from mmcore.export import bundle as B
from mmcore.export.schema import BundleError

DEFAULT_DECISION = {"threshold": 0.5, "temperature": 1.0, "description": "0.5 (no decision saved)"}


class Scorer:
    """What bundle and run scorers share; subclasses set the attributes and implement :meth:`logits`."""

    kind = ""
    #: the resolved recipe as plain data
    recipe_data: dict
    decision: dict
    preprocessing = None
    source: Path

    @property
    def modality(self):
        return (self.recipe_data.get("train") or {}).get("modality", "multimodal")

    @property
    def uses_vision(self):
        return self.modality != "text_only"

    @property
    def uses_text(self):
        return self.modality != "vision_only"

    @property
    def data_config(self):
        return self.recipe_data.get("data") or {}

    @property
    def max_image_pixels(self):
        from mmcore.data.images import DEFAULT_MAX_IMAGE_PIXELS

        return int(self.data_config.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)

    @property
    def ocr(self):
        """The recipe's ``data.ocr`` table (engine, lang) or None."""
        return self.data_config.get("ocr") or None

    def load_image(self, source):
        """A path or binary file -> RGB PIL image (BadImageError with the reason)."""
        from mmcore.data.images import load_rgb

        target = self.preprocessing.target_size if self.preprocessing is not None else None
        return load_rgb(source, target_size=target, max_pixels=self.max_image_pixels)

    def preprocess(self, image):
        """RGB PIL image -> the vision encoder's input tensors for one image."""
        return self.preprocessing(image)

    def logits(self, vision_items, texts):
        """Per-image inputs (from :meth:`preprocess`, or None) and texts (or None) -> float64 logits [B]."""
        raise NotImplementedError

    def decide(self, logits):
        """Logits -> (raw score, calibrated score, prediction) arrays at the run's decision."""
        from mmcore.engine.outputs import score_split

        raw, calibrated, predicted, _ = score_split(
            np.asarray(logits, dtype=np.float64), None,
            temperature=float(self.decision["temperature"]), threshold=float(self.decision["threshold"]),
        )
        return raw, calibrated, predicted

    #: where the model runs (``cpu``, ``cuda:0``) and how (onnxruntime's providers, or torch's device type)
    device_name = None
    providers = ()

    def metadata(self):
        """Model, recipe summary, decision, device and versions (``GET /metadata``)."""
        recipe = self.recipe_data
        return {
            "source": str(self.source),
            "kind": self.kind,
            "device": self.device_name,
            "providers": list(self.providers),
            "experiment": recipe.get("experiment"),
            "modality": self.modality,
            "vision": (recipe.get("vision") or {}).get("name") if self.uses_vision else None,
            "text": (recipe.get("text") or {}).get("name") if self.uses_text else None,
            "pooling": (recipe.get("pooling") or {}).get("name") if self.uses_vision else None,
            "fusion": (recipe.get("fusion") or {}).get("name") if self.modality == "multimodal" else None,
            "threshold": float(self.decision["threshold"]),
            "temperature": float(self.decision["temperature"]),
            "threshold_rule": self.decision.get("description"),
            "ocr": self.ocr,
            "versions": B.versions(),
        }


class BundleScorer(Scorer):
    """An export bundle scored with onnxruntime (or TorchScript): no run directory, no training data.

    Every file is checked against its schema as it is read (:mod:`mmcore.export.schema`); the
    preprocessing and host featurizers are rebuilt from the classes the registry declares
    (``registry``: the installed plugins by default). ``verify``: see :func:`~mmcore.export.bundle.read_manifest`.
    """

    kind = "bundle"

    def __init__(self, folder, *, device="auto", verify=None, registry=None):
        from mmcore.export.inputs import read_host_inputs
        from mmcore.export.onnx import GraphRunner
        from mmcore.export.schema import Decision, read_json, read_recipe, structure_file

        folder = Path(folder)
        self.source = folder
        self.manifest = B.read_manifest(folder, verify=verify)
        #: the run's recipe as data, and structured (components' params left as data)
        self.recipe_data, self.recipe = read_recipe(folder / B.RECIPE)
        decision = structure_file(read_json(folder / B.DECISION, what="the decision"), Decision, path=folder / B.DECISION)
        self.decision = attrs.asdict(decision)
        graph = self.manifest.graph
        if self.manifest.modality != self.modality:
            raise BundleError(f"{folder / B.MANIFEST}: modality: {self.manifest.modality!r}, but {B.RECIPE} says "
                              f"{self.modality!r}")
        unnamed = [name for name in graph.inputs if name not in (*graph.vision_inputs, *graph.text_inputs)]
        if unnamed:
            raise BundleError(f"{folder / B.MANIFEST}: graph.inputs: {unnamed[0]!r} is neither a vision nor a text input")
        self.input_names = graph.inputs
        self.vision_names = graph.vision_inputs
        inputs = read_host_inputs(folder, registry or _installed_registry(), bundle_format=self.manifest.bundle_format,
                                  vision=self.uses_vision, text=self.uses_text)
        self.preprocessing, self.host_text = inputs.preprocessing, inputs.text
        self.runner = GraphRunner(folder / graph.file, graph.format, device=device, external_data=graph.external_data)

    @property
    def device_name(self):
        return self.runner.device_name

    @property
    def providers(self):
        return self.runner.providers

    def text_feeds(self, texts):
        """Strings -> the graph's text inputs: token ids (int64) and/or host features (float32)."""
        return self.host_text.feeds(texts)

    def logits(self, vision_items, texts):
        """Collate, make the text inputs and run the graph."""
        feeds = {}
        if self.uses_vision:
            collated = self.preprocessing.collate(vision_items)
            feeds.update({name: collated[name].numpy() for name in self.vision_names})
        if self.uses_text:
            feeds.update(self.text_feeds(texts))
        return self.runner({name: feeds[name] for name in self.input_names})


class RunScorer(Scorer):
    """A finished run directory scored with its PyTorch model, from raw images, in float32
    (no autocast, no feature cache): what a bundle of the run computes."""

    kind = "run"

    def __init__(self, run_dir, *, registry=None, device="auto"):
        from mmcore.commands.evaluate import load_run
        from mmcore.recipe import recipe_to_dict

        self.source = Path(run_dir)
        self.pipeline, ckpt = load_run(run_dir, registry=registry, progress=False, use_cache=False, device=device,
                                       fp32=True)
        self.pipeline.model.eval()
        self.recipe_data = recipe_to_dict(self.pipeline.recipe)
        self.decision = {**DEFAULT_DECISION, **(ckpt.get("decision") or {})}
        vision = self.pipeline.model.vision
        self.preprocessing = vision.preprocessing if vision is not None else None

    @property
    def device_name(self):
        return str(self.pipeline.device)

    @property
    def providers(self):
        return [f"torch {self.pipeline.device.type}"]

    def logits(self, vision_items, texts):
        """The run's own forward in float32 (device and channels_last as in ``Trainer.predict``)."""
        import torch

        from mmcore.engine.step import prepare_batch

        pipeline = self.pipeline
        batch = {}
        if self.uses_vision:
            batch["vision"] = self.preprocessing.collate(vision_items)
        if self.uses_text:
            batch["text"] = list(texts)
        batch = prepare_batch(batch, pipeline.device, pipeline.channels_last)
        with torch.no_grad():
            out = pipeline.model(batch).logit
        return out.float().cpu().double().numpy().reshape(-1)


def open_scorer(path, *, registry=None, device="auto", verify=None):
    """A :class:`BundleScorer` for a bundle folder, else a :class:`RunScorer` for a run directory.

    ``device``: ``auto``/``cpu``/``cuda[:N]``; ``verify`` (bundles): True hashes every file.
    """
    path = Path(path)
    if B.is_bundle(path):
        return BundleScorer(path, device=device, verify=verify, registry=registry)
    if not path.is_dir():
        raise RunError(f"{path}: neither a run directory nor an export bundle (not found)")
    return RunScorer(path, registry=registry, device=device)


def _installed_registry():
    from mmcore.plugins.manager import get_registry

    return get_registry()
