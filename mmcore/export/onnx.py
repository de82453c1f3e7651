"""The whole fused classifier as one graph: image inputs + token ids -> one logit.

Tokenization stays outside the graph (the bundle carries the tokenizer); everything after it
— the text encoder's transformer and pooling, the vision encoder, pooling, fusion and head —
is traced into ONNX (``torch.onnx.export``) or, where ONNX cannot express a model, TorchScript.
Every input has a dynamic batch axis; token sequences and NaFlex patch sequences have a
dynamic length axis too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcore.errors import RunError
from mmcore.export import FORMATS  # noqa: F401 - defined without torch for the CLI, re-exported here

GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
OPSET = 18


class ExportUnsupported(RunError):
    """A component that cannot be exported; the message names it and says why."""


class TextGraph(nn.Module):
    """A text encoder's tensor part: token ids (+ mask, + token types) -> the embedding it encodes.

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


def text_tokenizer(encoder):
    """The HF tokenizer of a text encoder and the token inputs its model takes, or ExportUnsupported."""
    from mmcore.kit.text import SentenceTransformersTextEncoder, TransformersTextEncoder

    if isinstance(encoder, SentenceTransformersTextEncoder):
        tokenizer = encoder.model.tokenizer
        wanted = ("input_ids", "attention_mask", "token_type_ids")
    elif isinstance(encoder, TransformersTextEncoder):
        tokenizer = encoder.tokenizer
        wanted = ("input_ids", "attention_mask", "token_type_ids")
    else:
        raise ExportUnsupported(
            f"text encoder {encoder.name!r} ({type(encoder).__name__}): cannot be exported: it turns strings into "
            "vectors in Python with no separate tokenizer, so tokenization cannot stay outside the graph "
            "(exportable: text encoders built on mmcore.kit.text)"
        )
    names = [name for name in tokenizer.model_input_names if name in wanted]
    return tokenizer, names


class FusedModel(nn.Module):
    """The classifier with flat tensor inputs (vision inputs, then token inputs) -> logit [B]."""

    def __init__(self, classifier, vision_names, text_names):
        super().__init__()
        self.classifier = classifier
        self.vision_names = tuple(vision_names)
        self.text_names = tuple(text_names)
        self.text_graph = TextGraph(classifier.text, text_names) if classifier.uses_text else None

    def forward(self, *inputs):
        """Tensors in the order of :attr:`input_names` -> one logit per row."""
        n = len(self.vision_names)
        batch = {}
        if self.vision_names:
            batch["vision"] = dict(zip(self.vision_names, inputs[:n]))
        if self.text_graph is not None:
            batch["text_feature"] = self.text_graph(*inputs[n:])
        return self.classifier(batch).float().reshape(-1)

    @property
    def input_names(self):
        return [*self.vision_names, *self.text_names]


def dynamic_axes(fused, example):
    """Axis 0 (batch) of every input; axis 1 of token inputs and of NaFlex patch inputs (not spatial_shapes)."""
    axes = {}
    for name, tensor in zip(fused.input_names, example):
        axes[name] = {0: "batch"}
        if name in fused.text_names:
            axes[name][1] = "tokens"
        elif tensor.dim() in (2, 3) and name != "spatial_shapes":
            axes[name][1] = "patches"
    axes["logit"] = {0: "batch"}
    return axes


def write_graph(fused, example, path, fmt):
    """Trace ``fused`` on ``example`` (a tuple of tensors) into ``path`` as ``fmt``."""
    fused.eval()
    if fmt == "onnx":
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow: parity decides
            torch.onnx.export(
                fused, tuple(example), str(path), input_names=fused.input_names, output_names=["logit"],
                dynamic_axes=dynamic_axes(fused, example), opset_version=OPSET, dynamo=False,
            )
        return
    with torch.no_grad():
        traced = torch.jit.trace(fused, tuple(example), check_trace=False, strict=False)
    traced.save(str(path))


class GraphRunner:
    """Runs an exported graph on numpy inputs: onnxruntime for ONNX, torch.jit for TorchScript."""

    def __init__(self, path, fmt, *, device=None):
        self.format = fmt
        if fmt == "onnx":
            import onnxruntime as ort

            providers = ["CPUExecutionProvider"]
            if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(str(path), providers=providers)
            self.types = {i.name: _numpy_type(i.type) for i in self.session.get_inputs()}
        else:
            self.device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
            self.module = torch.jit.load(str(path), map_location=self.device).eval()

    @property
    def providers(self):
        return self.session.get_providers() if self.format == "onnx" else [str(self.device)]

    def __call__(self, feeds):
        """``{input name: numpy array}`` -> logits as float64 [B]."""
        if self.format == "onnx":
            feeds = {name: np.asarray(value).astype(self.types[name], copy=False) for name, value in feeds.items()
                     if name in self.types}
            return self.session.run(["logit"], feeds)[0].astype(np.float64).reshape(-1)
        with torch.no_grad():
            tensors = [torch.from_numpy(np.asarray(v)).to(self.device) for v in feeds.values()]
            return self.module(*tensors).double().cpu().numpy().reshape(-1)


def _numpy_type(onnx_type):
    return {
        "tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
        "tensor(bool)": np.bool_, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    }.get(onnx_type, np.float32)
