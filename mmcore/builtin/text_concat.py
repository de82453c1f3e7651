"""The ``concat`` text encoder: several text encoders side by side, each L2-normalised.

A classical signal beside a deep one, e.g. character n-grams (fitted on the training split)
next to a sentence embedding::

    [text]
    name = "concat"
    params.encoders = [{ name = "minilm" }, { name = "ngrams", params = { n_features = 4096 } }]

``mmcore export`` ships it when every part is exportable on its own (a tokenizer or a host
featurizer, see :mod:`mmcore.export.text`); the graph computes each part, then :meth:`combine`.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mmcore.errors import RecipeError
from mmcore.interfaces import TextEncoder, identity_string
from mmcore.kit.weights import PartRef
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import FieldError


def _parts(instance, attribute, value):
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise FieldError(attribute.name, "must list at least two text encoders ({ name = ..., params = {...} })")
    for i, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("name"), str):
            raise FieldError(f"{attribute.name}[{i}]", "must be a table with a name (and optional params)")
        extra = set(part) - {"name", "params"}
        if extra:
            raise FieldError(f"{attribute.name}[{i}]", f"unknown key {sorted(extra)[0]!r} (expected name, params)")


@attrs.frozen(kw_only=True)
class ConcatParams:
    """``encoders``: the text encoders to concatenate, in order, each ``{ name, params }``."""

    encoders: list = attrs.field(validator=_parts)


class ConcatTextEncoder(TextEncoder):
    """Embeddings of several text encoders, each L2-normalised, concatenated."""

    name = "concat"

    def __init__(self, parts):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_dim = sum(part.out_dim for part in parts)
        self.weights = "+".join(part.weights for part in parts)
        self.batch_size = min(part.batch_size for part in parts)
        self.fits_on_train = any(part.fits_on_train for part in parts)

    def encode(self, texts):
        return self.combine([part.encode(texts) for part in self.parts])

    def combine(self, vectors):
        """The parts' embeddings, in order -> this encoder's: each L2-normalised, concatenated.
        The exported graph calls it too, on the parts' traced embeddings."""
        return torch.cat([F.normalize(vector.float(), dim=-1) for vector in vectors], dim=-1)

    def fit(self, texts):
        for part in self.parts:
            if part.fits_on_train:
                part.fit(texts)

    def fitted_state_keys(self):
        return [f"parts.{i}.{key}" for i, part in enumerate(self.parts) for key in part.fitted_state_keys()]

    @property
    def identity(self):
        return identity_string(self.name, "parts", None, {"parts": [part.identity for part in self.parts]})


def build_concat(params, *, build_part):
    parts = []
    for i, part in enumerate(params.encoders):
        if part["name"] == "concat":
            raise RecipeError(f"text.params.encoders[{i}].name: a concat cannot contain another concat")
        encoder = build_part("text", part["name"], part.get("params", {}), path=f"text.params.encoders[{i}]")
        if encoder is None:
            raise RecipeError(f"text.params.encoders[{i}].name: {part['name']!r} is no text encoder")
        parts.append(encoder)
    return ConcatTextEncoder(parts)


def concat_weights(params):
    """The union of the parts' weights: each part as a :class:`~mmcore.kit.weights.PartRef`."""
    return [
        PartRef(kind="text", name=part["name"], params=part.get("params", {}), key=f"params.encoders[{i}]")
        for i, part in enumerate(params.encoders)
    ]


@hookimpl
def register_text_encoders(register):
    register("concat", build_concat, ConcatParams,
             weights=concat_weights)
