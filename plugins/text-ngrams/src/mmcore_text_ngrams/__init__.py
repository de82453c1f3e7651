"""The ``ngrams`` text encoder: word and character n-grams, hashed, weighted by TF-IDF.

Spam that garbles its words on purpose and noisy OCR defeat sentence embeddings; character
n-grams carry what they miss. The vectoriser is scikit-learn's stateless ``HashingVectorizer``
(no vocabulary to store); the inverse document frequencies are *fitted on the training split*
(``fits_on_train``) and kept as tensor buffers, so a run's checkpoint carries them without
pickle and ``eval``/``predict`` restore them. Each block (words, characters) is L2-normalised,
as scikit-learn's ``TfidfVectorizer`` does; the embedding is their concatenation.
"""

from __future__ import annotations

import hashlib

import attrs
import numpy as np
import torch

from mmcore import FieldError, MmcoreError, TextEncoder, at_least, hookimpl, identity_string, one_of

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


class NgramTextEncoder(TextEncoder):
    """Hashed n-gram TF-IDF; ``fit`` learns the inverse document frequencies."""

    name = "ngrams"
    weights = "fitted"
    fits_on_train = True

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.blocks = [b for b, on in (("word", params.words), ("char", params.chars)) if on]
        self.out_dim = params.n_features * len(self.blocks)
        self.batch_size = params.batch_size
        for block in self.blocks:
            self.register_buffer(f"idf_{block}", torch.ones(params.n_features))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.int64))

    def _vectorizer(self, block):
        from sklearn.feature_extraction.text import HashingVectorizer

        p = self.params
        analyzer, ngrams = ("word", p.word_ngrams) if block == "word" else (p.char_analyzer, p.char_ngrams)
        return HashingVectorizer(
            analyzer=analyzer, ngram_range=tuple(ngrams), n_features=p.n_features,
            alternate_sign=False, norm=None, lowercase=p.lowercase, dtype=np.float32,
        )

    def fit(self, texts):
        """Smoothed IDF, as scikit-learn's ``TfidfTransformer``: ``ln((1 + n) / (1 + df)) + 1``."""
        n = len(texts)
        for block in self.blocks:
            counts = self._vectorizer(block).transform(texts).tocsc()
            df = np.diff(counts.indptr).astype(np.float64)
            idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
            getattr(self, f"idf_{block}").copy_(torch.from_numpy(idf.astype(np.float32)))
        self.fitted.fill_(1)

    def encode(self, texts):
        if not int(self.fitted):
            raise MmcoreError("ngrams: the encoder is not fitted; train a run with it (mmcore run) to fit it on the training split")
        parts = []
        for block in self.blocks:
            tf = self._vectorizer(block).transform(texts)
            if self.params.sublinear_tf:
                tf.data = np.log(tf.data) + 1.0
            dense = torch.from_numpy(tf.toarray()) * getattr(self, f"idf_{block}").cpu()
            parts.append(torch.nn.functional.normalize(dense, dim=-1))
        return torch.cat(parts, dim=-1).to(self.fitted.device)

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
    register("ngrams", build_ngrams, NgramParams)
