"""The ``ngrams`` text encoder: word and character n-grams, hashed, weighted by TF-IDF.

Spam that garbles its words on purpose and noisy OCR defeat sentence embeddings; character
n-grams carry what they miss. The vectoriser is scikit-learn's stateless ``HashingVectorizer``
(no vocabulary to store); the inverse document frequencies are *fitted on the training split*
(``fits_on_train``) and kept as tensor buffers, so a run's checkpoint carries them without
pickle and ``eval``/``predict`` restore them. Each block (words, characters) is L2-normalised,
as scikit-learn's ``TfidfVectorizer`` does; the embedding is their concatenation.

The encoder is two halves so that ``mmcore export`` can ship it: :class:`NgramFeaturizer`
(strings -> hashed, sublinear term frequencies per block; the host side a bundle rebuilds from
its fields) and :meth:`NgramTextEncoder.encode_features` (``tf * idf``, L2 per block,
concatenated; traced into the ONNX graph with the fitted IDF). ``encode`` is exactly the one
after the other, so a run and its bundle compute the same thing.
"""

from __future__ import annotations

import hashlib

import attrs
import numpy as np
import torch

from mmcore import FieldError, HostFeaturizer, MmcoreError, TextEncoder, at_least, hookimpl, identity_string, one_of

ANALYZERS = ("word", "char_wb", "char")


def _ngram_range(instance, attribute, value):
    if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value):
        raise FieldError(attribute.name, f"must be [min_n, max_n] with 1 <= min_n (got {list(value)})")
    if value[0] > value[1]:
        raise FieldError(attribute.name, f"min_n must be <= max_n (got {list(value)})")


def _power_of_two(instance, attribute, value):
    if value < 16 or value & (value - 1):
        raise FieldError(attribute.name, f"must be a power of two >= 16 (got {value})")


@attrs.frozen(kw_only=True)
class NgramParams:
    """Word and character n-grams.

    ``word_ngrams`` / ``char_ngrams``: n-gram ranges (``[0, 0]`` is not allowed; set
    ``char_ngrams_enabled = false`` to leave a block out). ``n_features``: hashed dimensions per
    block (the embedding has twice this many when both blocks are on). ``char_analyzer``:
    ``char_wb`` (n-grams inside word boundaries, scikit-learn's) or ``char``.
    """

    word_ngrams: list = attrs.field(factory=lambda: [1, 2], validator=_ngram_range)
    char_ngrams: list = attrs.field(factory=lambda: [2, 5], validator=_ngram_range)
    words: bool = True
    chars: bool = True
    char_analyzer: str = attrs.field(default="char_wb", validator=one_of("char_wb", "char"))
    n_features: int = attrs.field(default=4096, validator=_power_of_two)
    sublinear_tf: bool = True
    lowercase: bool = True
    batch_size: int = attrs.field(default=256, validator=at_least(1))

    def __attrs_post_init__(self):
        if not (self.words or self.chars):
            raise FieldError("chars", "at least one of words, chars must be true")


@attrs.frozen(kw_only=True)
class NgramFeaturizer(HostFeaturizer):
    """The host half of ``ngrams``: strings -> hashed term frequencies, one dense block each.

    ``{"word_tf": [B, n_features], "char_tf": [B, n_features]}`` (float32; ``1 + ln(tf)`` with
    ``sublinear_tf``), the blocks in :attr:`blocks`. Stateless: the fitted IDF stays in the encoder.
    Its fields are plain data, so an export bundle stores and rebuilds it without pickle.
    """

    blocks: tuple[str, ...] = ("word", "char")
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 5)
    char_analyzer: str = "char_wb"
    n_features: int = 4096
    sublinear_tf: bool = True
    lowercase: bool = True

    @classmethod
    def from_params(cls, params):
        """The featurizer a ``NgramParams`` describes."""
        blocks = tuple(b for b, on in (("word", params.words), ("char", params.chars)) if on)
        return cls(blocks=blocks, word_ngrams=tuple(params.word_ngrams), char_ngrams=tuple(params.char_ngrams),
                   char_analyzer=params.char_analyzer, n_features=params.n_features,
                   sublinear_tf=params.sublinear_tf, lowercase=params.lowercase)

    @property
    def names(self):
        return tuple(f"{block}_tf" for block in self.blocks)

    def vectorizer(self, block):
        """scikit-learn's stateless ``HashingVectorizer`` for ``block`` (raw counts, no norm)."""
        from sklearn.feature_extraction.text import HashingVectorizer

        analyzer, ngrams = ("word", self.word_ngrams) if block == "word" else (self.char_analyzer, self.char_ngrams)
        return HashingVectorizer(
            analyzer=analyzer, ngram_range=tuple(ngrams), n_features=self.n_features,
            alternate_sign=False, norm=None, lowercase=self.lowercase, dtype=np.float32,
        )

    def counts(self, block, texts):
        """Raw hashed n-gram counts of ``texts`` (sparse [B, n_features]); what the IDF is fitted on."""
        return self.vectorizer(block).transform(texts)

    def __call__(self, texts):
        features = {}
        for block, name in zip(self.blocks, self.names):
            tf = self.counts(block, texts)
            if self.sublinear_tf:
                tf.data = np.log(tf.data) + 1.0
            features[name] = tf.toarray().astype(np.float32, copy=False)
        return features


class NgramTextEncoder(TextEncoder):
    """Hashed n-gram TF-IDF; ``fit`` learns the inverse document frequencies."""

    name = "ngrams"
    weights = "fitted"
    fits_on_train = True

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.featurizer = NgramFeaturizer.from_params(params)
        self.blocks = list(self.featurizer.blocks)
        self.out_dim = params.n_features * len(self.blocks)
        self.batch_size = params.batch_size
        for block in self.blocks:
            self.register_buffer(f"idf_{block}", torch.ones(params.n_features))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.int64))

    def fit(self, texts):
        """Smoothed IDF, as scikit-learn's ``TfidfTransformer``: ``ln((1 + n) / (1 + df)) + 1``."""
        n = len(texts)
        for block in self.blocks:
            counts = self.featurizer.counts(block, texts).tocsc()
            df = np.diff(counts.indptr).astype(np.float64)
            idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
            getattr(self, f"idf_{block}").copy_(torch.from_numpy(idf.astype(np.float32)))
        self.fitted.fill_(1)

    def _require_fitted(self):
        if not int(self.fitted):
            raise MmcoreError("ngrams: the encoder is not fitted; train a run with it (mmcore run) to fit it on the training split")

    def encode(self, texts):
        self._require_fitted()
        features = self.featurizer(texts)
        return self.encode_features(**{name: torch.from_numpy(array).to(self.device) for name, array in features.items()})

    def host_features(self):
        self._require_fitted()  # an unfitted export would silently weigh every n-gram alike
        return self.featurizer

    def encode_features(self, **features):
        """``tf * idf`` per block, each L2-normalised, concatenated (the part ``mmcore export`` traces)."""
        parts = [
            torch.nn.functional.normalize(features[f"{block}_tf"] * getattr(self, f"idf_{block}"), dim=-1)
            for block in self.blocks
        ]
        return torch.cat(parts, dim=-1)

    def fitted_state_keys(self):
        return [f"idf_{block}" for block in self.blocks] + ["fitted"]

    @property
    def identity(self):
        digest = hashlib.sha1()
        for key in self.fitted_state_keys():
            digest.update(getattr(self, key).cpu().numpy().tobytes())
        return identity_string(
            self.name, self.weights, None,
            {"params": attrs.asdict(self.params), "out_dim": self.out_dim, "fit": digest.hexdigest()[:16]},
        )


def build_ngrams(params):
    return NgramTextEncoder(params)


@hookimpl
def register_text_encoders(register):
    register("ngrams", build_ngrams, NgramParams, data_classes=(NgramFeaturizer,))
