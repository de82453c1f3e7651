"""A bundle's text side: how the host turns strings into the graph's text inputs.

Each part of the text encoder (one, or one per encoder of a ``concat``) is either

- a *tokenizer* part (an encoder built on :mod:`mmcore.kit.text`): its Hugging Face tokenizer
  is saved in the bundle and makes int64 token ids, padded to the batch's longest text; or
- a *featurizer* part (an encoder whose ``host_features()`` gives a
  :class:`~mmcore.interfaces.HostFeaturizer`): the featurizer's module, class and fields go in
  ``text.json`` and it is rebuilt from them (no pickle) to make named float32 arrays.

``text.json`` for one encoder keeps the layout of bundle format 1 (``name``, ``prefix``,
``max_length``, ``inputs``, the tokenizer in ``tokenizer/``), or holds ``featurizer`` instead of
the tokenizer fields. For a ``concat`` it lists ``parts``, each as above plus ``input_prefix``
(the graph names its inputs ``text{i}.{name}``) and, for a tokenizer part, the ``tokenizer``
folder (``tokenizers/text{i}``). Fitted state (the n-gram IDF) is never here: it is in the
graph's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np

from mmcore.errors import RunError
from mmcore.export import bundle as B


def write_text_side(folder, plan):
    """Save ``plan``'s tokenizers into ``folder``; returns ``text.json``'s data."""
    folder = Path(folder)
    if not plan.combined:
        return {"name": plan.encoder.name, **_write_part(folder, plan.parts[0], B.TOKENIZER)}
    parts = []
    for i, part in enumerate(plan.parts):
        described = _write_part(folder, part, f"{B.TOKENIZERS}/text{i}")
        parts.append({"name": part.encoder.name, "input_prefix": part.input_prefix, **described})
    return {"name": plan.encoder.name, "inputs": plan.graph_names, "parts": parts}


def _write_part(folder, part, tokenizer_dir):
    if part.featurizer is not None:
        described = B.describe_object(part.featurizer)
        try:
            json.dumps(described)
        except TypeError as exc:
            from mmcore.export.onnx import ExportUnsupported

            raise ExportUnsupported(f"text encoder {part.encoder.name!r}: its host featurizer "
                                    f"{described['module']}.{described['class']} has fields that are not plain "
                                    f"JSON data ({exc}); a bundle stores them as JSON") from None
        return {"inputs": list(part.names), "featurizer": described}
    part.tokenizer.save_pretrained(str(folder / tokenizer_dir))
    data = {"prefix": getattr(part.encoder, "prefix", ""), "max_length": int(part.encoder.max_length),
            "inputs": list(part.names)}
    if part.input_prefix:
        data["tokenizer"] = tokenizer_dir
    return data


@attrs.frozen(eq=False)
class HostTokenizer:
    """Strings -> a tokenizer part's token ids (the encoder's prefix and max_length)."""

    tokenizer: object
    prefix: str
    max_length: int
    names: tuple
    input_prefix: str = ""

    def __call__(self, texts):
        batch = self.tokenizer([self.prefix + text for text in texts], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="np")
        return {self.input_prefix + name: np.asarray(batch[name], dtype=np.int64) for name in self.names}


@attrs.frozen(eq=False)
class HostFeatures:
    """Strings -> a featurizer part's float32 arrays."""

    featurizer: object
    names: tuple
    source: str
    input_prefix: str = ""

    def __call__(self, texts):
        arrays = self.featurizer(texts)
        missing = [name for name in self.names if name not in arrays]
        if missing:
            raise RunError(f"{self.source}: featurizer {type(self.featurizer).__qualname__} gave no {missing[0]!r} "
                           f"(it gives {', '.join(sorted(arrays)) or 'nothing'})")
        return {self.input_prefix + name: np.asarray(arrays[name], dtype=np.float32) for name in self.names}


class HostText:
    """A bundle's text side, read back: :meth:`feeds` makes every text input of the graph."""

    def __init__(self, folder):
        folder = Path(folder)
        path = folder / B.TEXT
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{path}: cannot read ({exc})") from None
        self.data = data
        if "parts" in data:
            self.parts = [_read_part(folder, part, f"{path}: parts[{i}]", part.get("tokenizer"))
                          for i, part in enumerate(data["parts"])]
        else:
            self.parts = [_read_part(folder, data, str(path), B.TOKENIZER)]

    def feeds(self, texts):
        """Strings (None reads as empty) -> ``{graph input name: array}`` for every text input."""
        return text_feeds(self.parts, texts)


def text_feeds(parts, texts):
    """Every host part's inputs for ``texts`` (None reads as empty), in one dict."""
    texts = ["" if text is None else str(text) for text in texts]
    feeds = {}
    for part in parts:
        feeds.update(part(texts))
    return feeds


def host_parts(plan):
    """The host side of a :class:`~mmcore.export.onnx.TextPlan` straight from its encoders, before
    any bundle exists (model-level checks and benchmarks; a bundle reads its own with :class:`HostText`)."""
    parts = []
    for part in plan.parts:
        if part.featurizer is not None:
            parts.append(HostFeatures(featurizer=part.featurizer, names=part.names, source=f"text encoder {part.encoder.name!r}",
                                      input_prefix=part.input_prefix))
        else:
            parts.append(HostTokenizer(tokenizer=part.tokenizer, prefix=getattr(part.encoder, "prefix", ""),
                                       max_length=int(part.encoder.max_length), names=part.names,
                                       input_prefix=part.input_prefix))
    return parts


def _read_part(folder, data, source, tokenizer_dir):
    names = tuple(data.get("inputs") or ())
    input_prefix = data.get("input_prefix", "")
    if "featurizer" in data:
        featurizer = B.rebuild_object(data["featurizer"], source=f"{source}: featurizer", what="text featurizer class")
        return HostFeatures(featurizer=featurizer, names=names, source=source, input_prefix=input_prefix)
    if not tokenizer_dir or not (folder / tokenizer_dir).is_dir():
        raise RunError(f"{source}: names no tokenizer folder that the bundle holds ({tokenizer_dir!r})")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder / tokenizer_dir))
    return HostTokenizer(tokenizer=tokenizer, prefix=data.get("prefix", ""), max_length=int(data["max_length"]),
                         names=names, input_prefix=input_prefix)
