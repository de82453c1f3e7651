"""An export bundle as a :class:`~mmcore.scoring.base.Scorer`: onnxruntime (or TorchScript), no run
directory, no training data. Reading a bundle is export's knowledge (:mod:`mmcore.export.bundle`,
:mod:`mmcore.export.schema`); this module only scores with what it reads.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from mmcore.export import bundle as B
from mmcore.export.schema import BundleError
from mmcore.scoring.base import Scorer


class BundleScorer(Scorer):
    """An export bundle scored with onnxruntime (or TorchScript).

    Every file is checked against its schema as it is read (:mod:`mmcore.export.schema`); the
    preprocessing and host featurizers are rebuilt from the classes the registry declares
    (``registry``: the installed plugins by default, loaded only when the bundle names a plugin's
    class). ``verify``: see :func:`~mmcore.export.bundle.read_manifest`.
    Embeddings are not offered (the graph outputs the logit only).
    """

    kind = "bundle"

    def __init__(self, folder, *, device="auto", verify=None, registry=None):
        from mmcore.export.inputs import read_host_inputs
        from mmcore.export.runner import GraphRunner
        from mmcore.export.schema import Decision, read_json, read_recipe, structure_file
        from mmcore.plugins.manager import InstalledDataClasses

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
        self.selected_epoch = self.manifest.selected_epoch
        self.input_names = graph.inputs
        self.vision_names = graph.vision_inputs
        inputs = read_host_inputs(folder, registry or InstalledDataClasses(), bundle_format=self.manifest.bundle_format,
                                  vision=self.uses_vision, text=self.uses_text)
        self.preprocessing, self.host_text = inputs.preprocessing, inputs.text
        device = B.bundle_device(folder, device, self.manifest.precision)  # an int8 graph: the CPU, or one line
        self.runner = GraphRunner(folder / graph.file, graph.format, device=device)

    @property
    def device_name(self):
        return self.runner.device_name

    @property
    def providers(self):
        return self.runner.providers

    def identity_file(self):
        """The manifest, which holds the sha256 of every other file."""
        return self.source / B.MANIFEST

    def text_feeds(self, texts):
        """Strings -> the graph's text inputs: token ids (int64) and/or host features (float32)."""
        return self.host_text.feeds(texts)

    def feeds(self, vision_items, texts):
        """The graph's inputs of a batch: collated images, token ids or host text features (numpy, by input name)."""
        feeds = {}
        if self.uses_vision:
            collated = self.preprocessing.collate(vision_items)
            feeds.update({name: collated[name].numpy() for name in self.vision_names})
        if self.uses_text:
            feeds.update(self.text_feeds(texts))
        return {name: feeds[name] for name in self.input_names}

    def logits(self, vision_items, texts):
        """Collate, make the text inputs and run the graph."""
        return self.runner(self.feeds(vision_items, texts))

