"""A bundle's text side: how the host turns strings into the graph's text inputs.

Each part of the text encoder (one, or one per encoder of a ``concat``) is either

- a *tokenizer* part (an encoder built on :mod:`mmcore.kit.text`): its Hugging Face tokenizer
  is saved in the bundle and makes int64 token ids, padded to the batch's longest text; or
- a *featurizer* part (an encoder whose ``host_features()`` gives a
  :class:`~mmcore.interfaces.HostFeaturizer`): the featurizer's class (by registry name: the
  encoder's plugin declares it, ``register(..., data_classes=(MyFeaturizer,))``) and fields go in
  the text side and it is rebuilt from them (no pickle, no import) to make named float32 arrays.

The text side (``inputs.json``'s ``text``; ``text.json`` up to bundle format 3) for one encoder
keeps the layout of bundle format 1 (``name``, ``prefix``, ``max_length``, ``inputs``, the
tokenizer in ``tokenizer/``), or holds ``featurizer`` instead of the tokenizer fields.

From bundle format 5 a tokenizer with a ``tokenizer.json`` (every fast tokenizer) is stored as
that file alone, and ``fast_tokenizer`` records what transformers read from
``tokenizer_config.json`` to pad and truncate (``pad_id``, ``pad_type_id``, ``pad_token``,
``padding_side``, ``truncation_side``): the host reads it with the ``tokenizers`` library, a
tenth of transformers' import time, to the same ids (tests/test_export_tokenizer.py). A slow-only
tokenizer, and the bundles of formats 1 to 4, are read with transformers as before. For a
``concat`` it lists ``parts``, each as above plus ``input_prefix``
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
from mmcore.export.schema import FAST_TOKENIZER_INPUTS, BundleError

#: the one file a fast tokenizer part keeps in its folder (bundle format 5)
TOKENIZER_JSON = "tokenizer.json"
#: a bundle's tokenizer.json is read whole: bounded (the largest common ones, Gemma's, are 33 MB)
MAX_TOKENIZER_BYTES = 256 << 20


def write_text_side(folder, plan, registry):
    """Save ``plan``'s tokenizers into ``folder``; returns the text side's data (``inputs.json``'s ``text``)."""
    folder = Path(folder)
    if not plan.combined:
        return {"name": plan.encoder.name, **_write_part(folder, plan.parts[0], B.TOKENIZER, registry)}
    parts = []
    for i, part in enumerate(plan.parts):
        described = _write_part(folder, part, f"{B.TOKENIZERS}/text{i}", registry)
        parts.append({"name": part.encoder.name, "input_prefix": part.input_prefix, **described})
    return {"name": plan.encoder.name, "inputs": plan.graph_names, "parts": parts}


def _write_part(folder, part, tokenizer_dir, registry):
    if part.featurizer is not None:
        from mmcore.export.onnx import ExportUnsupported

        try:
            described = B.describe_object(part.featurizer, registry, kind="text", component=part.encoder.name)
            json.dumps(described, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ExportUnsupported(f"text encoder {part.encoder.name!r}: its host featurizer "
                                    f"{type(part.featurizer).__qualname__} has fields that are not plain "
                                    f"JSON data ({exc}); a bundle stores them as JSON") from None
        except RunError as exc:
            raise ExportUnsupported(str(exc)) from None
        return {"inputs": list(part.names), "featurizer": described}
    part.tokenizer.save_pretrained(str(folder / tokenizer_dir))
    data = {"prefix": getattr(part.encoder, "prefix", ""), "max_length": int(part.encoder.max_length),
            "inputs": list(part.names)}
    if part.input_prefix:
        data["tokenizer"] = tokenizer_dir
    fast = _fast_tokenizer_info(part.tokenizer, folder / tokenizer_dir, part.names)
    if fast is not None:
        data["fast_tokenizer"] = fast
    return data


def _fast_tokenizer_info(tokenizer, tokenizer_dir, names):
    """``fast_tokenizer`` of a tokenizer saved with a ``tokenizer.json`` whose inputs the ``tokenizers``
    library makes, its other files removed (they hold nothing the host then reads); else None."""
    if not (tokenizer_dir / TOKENIZER_JSON).is_file() or tokenizer.pad_token is None or not set(names) <= set(FAST_TOKENIZER_INPUTS):
        return None
    for file in tokenizer_dir.iterdir():
        if file.name != TOKENIZER_JSON:
            file.unlink()
    return {"pad_id": int(tokenizer.pad_token_id), "pad_type_id": int(tokenizer.pad_token_type_id),
            "pad_token": str(tokenizer.pad_token), "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side}


@attrs.frozen(eq=False)
class HostTokenizer:
    """Strings -> a tokenizer part's token ids (the encoder's prefix and max_length) with its
    transformers tokenizer, padded to the batch's longest text."""

    tokenizer: object
    prefix: str
    max_length: int
    names: tuple
    input_prefix: str = ""

    def __call__(self, texts):
        batch = self.encode([self.prefix + text for text in texts])
        return {self.input_prefix + name: np.asarray(batch[name], dtype=np.int64) for name in self.names}

    def encode(self, texts):
        """Strings -> ``{input name: ids [B, longest]}``."""
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")


@attrs.frozen(eq=False)
class JsonHostTokenizer(HostTokenizer):
    """:class:`HostTokenizer` on a ``tokenizers.Tokenizer`` read from ``tokenizer.json``, set to pad
    and truncate as transformers does (:func:`read_fast_tokenizer`): the same ids without transformers."""

    def encode(self, texts):
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        return {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                "attention_mask": [e.attention_mask for e in encodings]}


def read_fast_tokenizer(path, info, max_length):
    """``tokenizer.json`` at ``path`` (bounded) -> a ``tokenizers.Tokenizer`` that truncates to
    ``max_length`` and pads to the batch's longest as ``info`` (:class:`~mmcore.export.schema.FastTokenizerInfo`) says,
    which is what a transformers fast tokenizer sets on it for ``padding=True, truncation=True``."""
    from mmcore.export import schema as S
    from mmcore.kit.deps import require

    tokenizers = require("tokenizers", "a bundle's tokenizer")
    data = S.read_bounded(path, limit=MAX_TOKENIZER_BYTES, what="the tokenizer")
    try:
        tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8", errors="replace"))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception for a file it cannot read
        if type(exc) is not Exception:
            raise
        raise BundleError(f"{path}: not a tokenizer the tokenizers library reads ({' '.join(str(exc).split())[:300]})") from None
    tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction=info.truncation_side)
    tokenizer.enable_padding(direction=info.padding_side, pad_id=info.pad_id, pad_type_id=info.pad_type_id,
                             pad_token=info.pad_token)
    return tokenizer


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
    """A bundle's text side, read back and checked: :meth:`feeds` makes every text input of the graph.

    ``info``: the :class:`~mmcore.export.schema.TextInfo` read from ``source`` (``inputs.json``'s
    ``text``, or a format 1 to 3 ``text.json``: see :func:`mmcore.export.inputs.read_host_inputs`);
    its tokenizers are read from their folders under ``folder``.
    """

    def __init__(self, folder, info, registry, *, source):
        folder = Path(folder)
        if info.parts is not None:
            self.parts = [_read_part(folder, part, f"{source}: parts[{i}]", part.tokenizer, part.input_prefix, registry)
                          for i, part in enumerate(info.parts)]
        else:
            self.parts = [_read_part(folder, info, str(source), B.TOKENIZER, "", registry)]

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


def _read_part(folder, info, source, tokenizer_dir, input_prefix, registry):
    """One part of the text side (a :class:`~mmcore.export.schema.TextPartInfo` or the single-part
    :class:`~mmcore.export.schema.TextInfo`) -> its host callable."""
    names = tuple(info.inputs)
    if info.featurizer is not None:
        featurizer = B.rebuild_object(info.featurizer, registry, source=f"{source}: featurizer", what="text featurizer class")
        return HostFeatures(featurizer=featurizer, names=names, source=source, input_prefix=input_prefix)
    if not tokenizer_dir or not (folder / tokenizer_dir).is_dir():
        raise RunError(f"{source}: names no tokenizer folder that the bundle holds ({tokenizer_dir!r})")
    if info.fast_tokenizer is not None:
        unmade = [name for name in names if name not in FAST_TOKENIZER_INPUTS]
        if unmade:
            raise BundleError(f"{source}: inputs: {unmade[0]!r} is not made by a fast tokenizer "
                           f"(it makes {', '.join(FAST_TOKENIZER_INPUTS)})")
        tokenizer = read_fast_tokenizer(folder / tokenizer_dir / TOKENIZER_JSON, info.fast_tokenizer, int(info.max_length))
        return JsonHostTokenizer(tokenizer=tokenizer, prefix=info.prefix, max_length=int(info.max_length),
                                 names=names, input_prefix=input_prefix)
    from mmcore.kit.deps import require

    transformers = require("transformers", "a bundle's tokenizer")
    # local files only, and no code from them: a tokenizer_config.json asking for remote code is refused
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder / tokenizer_dir), local_files_only=True, trust_remote_code=False)
    return HostTokenizer(tokenizer=tokenizer, prefix=info.prefix, max_length=int(info.max_length),
                         names=names, input_prefix=input_prefix)
