"""A bundle's tokenizer without transformers (bundle format 5): tokenizer.json read with the tokenizers
library, padded and truncated as inputs.json records, gives exactly the arrays transformers gives."""

import json
import types

import numpy as np
import pytest

from mmcore.export.onnx import TextPart, TextPlan
from mmcore.export.schema import BundleError, TextInfo, structure_file
from mmcore.export.text import HostText, HostTokenizer, JsonHostTokenizer, write_text_side
from mmcore.kit.text import offline_tokenizer

NAMES = ("input_ids", "token_type_ids", "attention_mask")
TEXTS = [
    "",
    "Buy now! 50% off",
    "word " * 600,  # far beyond any max_length
    "Ünïcödé café naïve Straße 日本語のテキスト 中文 한국어 العربية עברית 🎉👍🏽 e\u0301 zero\u200bwidth",
    "   \t\n  ",
    "\x00\x07 control \x1b characters",
    "UPPER lower MiXeD 12345 3.14 user@example.com https://example.com/a?b=c",
    "a",
    None,
]


def _tokenizer(padding_side="right", truncation_side="right"):
    tokenizer = offline_tokenizer()
    tokenizer.padding_side, tokenizer.truncation_side = padding_side, truncation_side
    return tokenizer


def _host_text(folder, tokenizer, *, max_length, prefix, fast):
    """The text side exported into ``folder`` and read back; ``fast=False`` lays it out as format 4 did
    (transformers' files beside tokenizer.json, no fast_tokenizer), which is read with transformers."""
    encoder = types.SimpleNamespace(name="minilm", prefix=prefix, max_length=max_length)
    plan = TextPlan(encoder=encoder, parts=(TextPart(encoder=encoder, names=NAMES, tokenizer=tokenizer),))
    data = write_text_side(folder, plan, registry=None)
    if not fast:
        del data["fast_tokenizer"]
        tokenizer.save_pretrained(str(folder / "tokenizer"))
    info = structure_file(json.loads(json.dumps(data)), TextInfo, path=folder / "inputs.json")
    return HostText(folder, info, None, source=f"{folder}/inputs.json: text")


@pytest.mark.parametrize("sides", [("right", "right"), ("left", "left"), ("left", "right")])
@pytest.mark.parametrize("max_length", [256, 12, 3])
def test_the_tokenizers_library_gives_transformers_ids(tmp_path, max_length, sides):
    prefix = "query: " if max_length == 12 else ""
    fast = _host_text(tmp_path / "fast", _tokenizer(*sides), max_length=max_length, prefix=prefix, fast=True)
    slow = _host_text(tmp_path / "slow", _tokenizer(*sides), max_length=max_length, prefix=prefix, fast=False)
    assert type(fast.parts[0]) is JsonHostTokenizer and type(slow.parts[0]) is HostTokenizer
    assert sorted(p.name for p in (tmp_path / "fast" / "tokenizer").iterdir()) == ["tokenizer.json"]
    batches = [TEXTS, TEXTS[:1], TEXTS[2:3], TEXTS[3:5], [TEXTS[1], TEXTS[2], TEXTS[0]]]
    for texts in batches:
        ours, theirs = fast.feeds(texts), slow.feeds(texts)
        assert list(ours) == list(theirs) == list(NAMES)
        for name in NAMES:
            assert ours[name].dtype == theirs[name].dtype == np.int64
            assert np.array_equal(ours[name], theirs[name]), (name, max_length, sides, texts)
    assert fast.feeds(TEXTS)["input_ids"].shape[1] == max_length  # the long text truncated, the rest padded to it


def test_a_tokenizer_json_the_library_cannot_read_is_one_line(tmp_path):
    _host_text(tmp_path, _tokenizer(), max_length=16, prefix="", fast=True)
    (tmp_path / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    data = {"name": "minilm", "max_length": 16, "inputs": list(NAMES), "fast_tokenizer": {"pad_id": 0, "pad_token": "[PAD]"}}
    info = structure_file(data, TextInfo, path=tmp_path / "inputs.json")
    with pytest.raises(BundleError) as refused:
        HostText(tmp_path, info, None, source="inputs.json: text")
    assert str(refused.value) == (f"{tmp_path}/tokenizer/tokenizer.json: not a tokenizer the tokenizers library reads "
                                  "(Model missing. at line 1 column 18)")


def test_fast_tokenizer_settings_are_checked_against_their_schema(tmp_path):
    data = {"name": "minilm", "max_length": 16, "inputs": list(NAMES),
            "fast_tokenizer": {"pad_id": 0, "pad_token": "[PAD]", "padding_side": "middle"}}
    with pytest.raises(BundleError) as refused:
        structure_file(data, TextInfo, path=tmp_path / "inputs.json")
    assert str(refused.value) == (f"{tmp_path}/inputs.json: fast_tokenizer.padding_side: must be one of right, left "
                                  "(got 'middle')")
