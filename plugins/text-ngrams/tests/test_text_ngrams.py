"""The ``ngrams`` encoder: equal to scikit-learn's TF-IDF, fitted on train, its state plain tensors."""

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

from mmcore import MmcoreError, RecipeError
from mmcore.testing import build, check_text_encoder, get_registry, structure

TRAIN = ["CHEAP meds no prescription!!", "grandma birthday photos", "hot stock alert: buy now", "see you at dinner", ""]
TEXTS = ["cheap stock meds", "birthday dinner", "", "v1agra ch3ap"]


def test_entry_point_registers_ngrams():
    assert get_registry().get("text", "ngrams").package == "mmcore-text-ngrams"


def test_contract():
    encoder = check_text_encoder("ngrams", {"n_features": 256})
    assert encoder.out_dim == 512 and encoder.fits_on_train


def _sklearn(analyzer, ngrams, n_features=256):
    hv = HashingVectorizer(analyzer=analyzer, ngram_range=ngrams, n_features=n_features, alternate_sign=False, norm=None)
    tfidf = TfidfTransformer(sublinear_tf=True).fit(hv.transform(TRAIN))
    return tfidf, tfidf.transform(hv.transform(TEXTS)).toarray()


def test_embedding_equals_scikit_learn_tfidf_of_hashed_words_and_char_ngrams():
    encoder = build("text", "ngrams", {"n_features": 256})
    encoder.fit(TRAIN)
    words, expected_words = _sklearn("word", (1, 2))
    chars, expected_chars = _sklearn("char_wb", (2, 5))
    np.testing.assert_allclose(encoder.idf_word.numpy(), words.idf_, rtol=1e-6)
    np.testing.assert_allclose(encoder.idf_char.numpy(), chars.idf_, rtol=1e-6)
    out = encoder(TEXTS).numpy()
    np.testing.assert_allclose(out, np.hstack([expected_words, expected_chars]), atol=1e-6)


def test_the_fit_changes_the_identity_and_unfitted_use_is_refused():
    encoder = build("text", "ngrams", {"n_features": 64})
    with pytest.raises(MmcoreError, match=r"^ngrams: the encoder is not fitted; train a run with it"):
        encoder(["x"])
    before = encoder.identity
    encoder.fit(TRAIN)
    after = encoder.identity
    encoder.fit(TRAIN[:2])
    assert len({before, after, encoder.identity}) == 3


def test_fitted_state_is_plain_tensors_that_round_trip_without_pickle(tmp_path):
    encoder = build("text", "ngrams", {"n_features": 64, "words": False})
    encoder.fit(TRAIN)
    state = {k: v for k, v in encoder.state_dict().items() if k in encoder.fitted_state_keys()}
    assert sorted(state) == ["fitted", "idf_char"]
    torch.save(state, tmp_path / "s.pt")
    restored = build("text", "ngrams", {"n_features": 64, "words": False})
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert restored.identity == encoder.identity
    torch.testing.assert_close(restored(TEXTS), encoder(TEXTS))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"char_ngrams": [5, 2]}, r"text\.params\.char_ngrams: min_n must be <= max_n \(got \[5, 2\]\)"),
        ({"n_features": 1000}, r"text\.params\.n_features: must be a power of two >= 16 \(got 1000\)"),
        ({"words": False, "chars": False}, r"text\.params\.chars: at least one of words, chars must be true"),
        ({"char_analyzer": "bytes"}, r"text\.params\.char_analyzer: must be one of"),
    ],
)
def test_bad_params_name_their_key(params, message):
    from mmcore_text_ngrams import NgramParams

    with pytest.raises(RecipeError, match=message):
        structure(params, NgramParams, source="r.toml", path="text.params")
