"""The whole fused classifier as one graph: image inputs + text inputs -> one logit.

String work stays outside the graph: a tokenizer (token ids) or a text encoder's host
featurizer (named float arrays, e.g. hashed n-gram counts; see
:meth:`mmcore.interfaces.TextEncoder.host_features`), both carried by the bundle. Everything
after it — the text encoder's transformer and pooling or its ``encode_features``, each part of
a ``concat``, the vision encoder, pooling, fusion and head — is traced into ONNX
(``torch.onnx.export``) or, where ONNX cannot express a model, TorchScript. Every input has a
dynamic batch axis; token sequences and NaFlex patch sequences have a dynamic length axis too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mmcore.errors import RunError
from mmcore.export import FORMATS  # noqa: F401 - defined without torch for the CLI, re-exported here
from mmcore.export.bundle import EXTERNAL_DATA, GRAPH_FILES  # noqa: F401 - GRAPH_FILES re-exported

OPSET = 18
#: weights above this size leave model.onnx for ONE external data file beside it (protobuf's hard
#: limit is 2 GiB for the whole model; 64 MiB are left for the graph itself). Tests lower it.
EXTERNAL_DATA_THRESHOLD = (2 << 30) - (64 << 20)


class ExportUnsupported(RunError):
    """A component that cannot be exported; the message names it and says why."""


@attrs.frozen(eq=False)
class TextPart:
    """One text encoder of the graph and how the host makes its inputs from strings.

    Exactly one of ``tokenizer`` (an encoder on :mod:`mmcore.kit.text`: token ids) and
    ``featurizer`` (a :class:`~mmcore.interfaces.HostFeaturizer`: named float arrays) is set.
    ``names`` are the encoder's own input names; the graph calls them ``input_prefix + name``.
    """

    encoder: nn.Module
    names: tuple
    input_prefix: str = ""
    tokenizer: object = None
    featurizer: object = None

    @property
    def graph_names(self):
        return [self.input_prefix + name for name in self.names]


@attrs.frozen(eq=False)
class TextPlan:
    """The text encoder as graph parts: one, or one per encoder of a ``concat`` (``combined``)."""

    encoder: nn.Module
    parts: tuple
    combined: bool = False

    @property
    def graph_names(self):
        return [name for part in self.parts for name in part.graph_names]

    @property
    def token_axes(self):
        """Graph input -> the name of its dynamic length axis (token inputs only; feature arrays are fixed-width)."""
        return {name: f"{part.input_prefix}tokens" for part in self.parts if part.tokenizer is not None
                for name in part.graph_names}

    @property
    def single_tokenizer(self):
        """True for the layout of bundle format 1: one encoder, a tokenizer, inputs named as the tokenizer names them."""
        return not self.combined and self.parts[0].tokenizer is not None


def plan_text(encoder):
    """How ``encoder`` goes into the graph, or ExportUnsupported naming the part that cannot.

    A ``concat`` becomes one part per encoder, its inputs named ``text{i}.{name}``; a single
    encoder keeps its inputs' own names (``input_ids``, ...), as bundles before concat have them.
    """
    from mmcore.builtin.text_concat import ConcatTextEncoder

    if isinstance(encoder, ConcatTextEncoder):
        parts = [_text_part(part, f"text{i}.", where=f"text.params.encoders[{i}] ({part.name!r})")
                 for i, part in enumerate(encoder.parts)]
        return TextPlan(encoder=encoder, parts=tuple(parts), combined=True)
    return TextPlan(encoder=encoder, parts=(_text_part(encoder, ""),))


def _text_part(encoder, input_prefix, where=None):
    featurizer = encoder.host_features()
    if featurizer is not None:
        return TextPart(encoder=encoder, names=tuple(featurizer.names), input_prefix=input_prefix, featurizer=featurizer)
    tokenizer, names = text_tokenizer(encoder, where=where)
    return TextPart(encoder=encoder, names=tuple(names), input_prefix=input_prefix, tokenizer=tokenizer)


def text_tokenizer(encoder, *, where=None):
    """The HF tokenizer of a text encoder and the token inputs its model takes, or ExportUnsupported."""
    from mmcore.kit.text import SentenceTransformersTextEncoder, TransformersTextEncoder

    if isinstance(encoder, SentenceTransformersTextEncoder):
        tokenizer = encoder.model.tokenizer
    elif isinstance(encoder, TransformersTextEncoder):
        tokenizer = encoder.tokenizer
    else:
        where = where or f"text encoder {encoder.name!r} ({type(encoder).__name__})"
        raise ExportUnsupported(
            f"{where}: cannot be exported: it turns strings into vectors in Python with neither a separate "
            "tokenizer nor a host featurizer, so the string work cannot stay outside the graph "
            "(exportable: text encoders built on mmcore.kit.text, or that implement "
            "TextEncoder.host_features and encode_features; see docs/plugins.md)"
        )
    wanted = ("input_ids", "attention_mask", "token_type_ids")
    names = [name for name in tokenizer.model_input_names if name in wanted]
    return tokenizer, names


class TokenTextGraph(nn.Module):
    """A tokenizer encoder's tensor part: token ids (+ mask, + token types) -> the embedding it encodes.

    Mirrors :meth:`mmcore.kit.text.FrozenTextEncoder.encode` after tokenization: the model's
    forward, pooling, float, then L2 normalization when the encoder normalizes.
    """

    def __init__(self, encoder, names):
        super().__init__()
        from mmcore.kit.text import SentenceTransformersTextEncoder

        self.encoder = encoder
        self.names = tuple(names)
        self.sentence_transformers = isinstance(encoder, SentenceTransformersTextEncoder)

    def forward(self, *tokens):
        """Token tensors in the order of ``names`` -> [B, out_dim] float."""
        batch = dict(zip(self.names, tokens))
        if self.sentence_transformers:
            vectors = self.encoder.model(dict(batch))["sentence_embedding"]
        else:
            vectors = self.encoder.pooled(batch)
        vectors = vectors.float()
        return F.normalize(vectors, dim=-1) if self.encoder.normalize else vectors


class FeatureTextGraph(nn.Module):
    """A featurizer encoder's tensor part: its ``encode_features``, which its ``encode`` also calls."""

    def __init__(self, encoder, names):
        super().__init__()
        self.encoder = encoder
        self.names = tuple(names)

    def forward(self, *arrays):
        """Feature tensors in the order of ``names`` -> [B, out_dim] float."""
        return self.encoder.encode_features(**dict(zip(self.names, arrays))).float()


class TextGraph(nn.Module):
    """The text encoder after the host side: every part's graph, then concat's ``combine`` when combined."""

    def __init__(self, plan):
        super().__init__()
        self.encoder = plan.encoder
        self.combined = plan.combined
        self.sizes = [len(part.names) for part in plan.parts]
        self.parts = nn.ModuleList(
            FeatureTextGraph(part.encoder, part.names) if part.featurizer is not None
            else TokenTextGraph(part.encoder, part.names)
            for part in plan.parts
        )

    def forward(self, *inputs):
        """Text inputs in the order of the plan's ``graph_names`` -> [B, out_dim] float."""
        vectors, start = [], 0
        for graph, size in zip(self.parts, self.sizes):
            vectors.append(graph(*inputs[start:start + size]))
            start += size
        return self.encoder.combine(vectors) if self.combined else vectors[0]


class FusedModel(nn.Module):
    """The classifier with flat tensor inputs (vision inputs, then text inputs) -> logit [B].

    ``text_plan`` defaults to :func:`plan_text` of the classifier's text encoder.
    """

    def __init__(self, classifier, vision_names, text_plan=None):
        super().__init__()
        self.classifier = classifier
        self.vision_names = tuple(vision_names)
        if classifier.uses_text and text_plan is None:
            text_plan = plan_text(classifier.text)
        self.text_plan = text_plan if classifier.uses_text else None
        self.text_names = tuple(self.text_plan.graph_names) if self.text_plan else ()
        self.text_graph = TextGraph(self.text_plan) if self.text_plan else None

    def forward(self, *inputs):
        """Tensors in the order of :attr:`input_names` -> one logit per row."""
        n = len(self.vision_names)
        batch = {}
        if self.vision_names:
            batch["vision"] = dict(zip(self.vision_names, inputs[:n]))
        if self.text_graph is not None:
            batch["text_feature"] = self.text_graph(*inputs[n:])
        return self.classifier(batch).logit.float().reshape(-1)

    @property
    def input_names(self):
        return [*self.vision_names, *self.text_names]


def dynamic_axes(fused, example):
    """Axis 0 (batch) of every input; axis 1 of token inputs (one length axis per tokenizer) and of
    NaFlex patch inputs (not spatial_shapes); featurizer arrays keep their fixed width."""
    token_axes = fused.text_plan.token_axes if fused.text_plan else {}
    axes = {}
    for name, tensor in zip(fused.input_names, example):
        axes[name] = {0: "batch"}
        if name in token_axes:
            axes[name][1] = token_axes[name]
        elif name in fused.text_names:
            continue
        elif tensor.dim() in (2, 3) and name != "spatial_shapes":
            axes[name][1] = "patches"
    axes["logit"] = {0: "batch"}
    return axes


def write_graph(fused, example, path, fmt):
    """Trace ``fused`` on ``example`` (a tuple of tensors) into ``path`` as ``fmt``.

    Returns the name of the ONNX graph's one external data file (:data:`EXTERNAL_DATA`, beside
    ``path``) when its weights are over :data:`EXTERNAL_DATA_THRESHOLD`, else None.
    """
    path = Path(path)
    fused.eval()
    if fmt != "onnx":
        with torch.no_grad():
            traced = torch.jit.trace(fused, tuple(example), check_trace=False, strict=False)
        traced.save(str(path))
        return None
    import warnings

    # torch writes a model over the protobuf limit as one file per tensor (305 for the default
    # recipe): trace into a folder of its own, then keep one graph file and at most one data file
    work = path.parent / f".{path.name}.trace"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow: parity decides
            torch.onnx.export(
                fused, tuple(example), str(work / path.name), input_names=fused.input_names, output_names=["logit"],
                dynamic_axes=dynamic_axes(fused, example), opset_version=OPSET, dynamo=False,
            )
        return _place_onnx(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _place_onnx(traced, path):
    """Move the traced graph to ``path``, its weights inline or in one external data file beside it."""
    import onnx

    spilled = [p for p in traced.parent.iterdir() if p != traced]
    if not spilled and traced.stat().st_size <= EXTERNAL_DATA_THRESHOLD:
        os.replace(traced, path)
        return None
    model = onnx.load(str(traced), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    return EXTERNAL_DATA
