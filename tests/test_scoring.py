"""The one scoring path: score_rows streams any scorer over rows in input order, with the text rule,
the bad-image policy and a bounded read-ahead; a run's scorer gives embeddings; a run's test split is
scored without filling the training feature cache."""

import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest

from mmcore.data.csvs import read_split
from mmcore.errors import DataError
from mmcore.scoring.base import EmbeddingsUnavailable, Scorer
from mmcore.scoring.rows import BATCHES_AHEAD, collect, score_rows
from mmcore.scoring.scorers import open_scorer


class Counting(Scorer):
    """A vision_only scorer whose model costs nothing; it counts images decoded and rows scored."""

    recipe_data = {"train": {"modality": "vision_only"}, "data": {"on_bad_image": "skip"}}
    decision = {"threshold": 0.5, "temperature": 1.0}

    def __init__(self):
        from mmcore.kit.vision import square_preprocessing

        self.preprocessing = square_preprocessing(8)
        self.decoded = self.scored = self.most_ahead = 0

    def load_image(self, source, **kwargs):
        image = super().load_image(source, **kwargs)
        self.decoded += 1
        self.most_ahead = max(self.most_ahead, self.decoded - self.scored)
        return image

    def logits(self, vision_items, texts):
        self.scored += len(vision_items)
        return np.arange(self.scored - len(vision_items), self.scored, dtype=np.float64)


@pytest.fixture(scope="module")
def run_scorer(exportable_run):
    return open_scorer(exportable_run, device="cpu")


def test_rows_come_back_in_input_order_batch_by_batch_and_shards_partition_them(run_scorer, demo_data):
    split = read_split(Path(demo_data) / "test.csv", demo_data)
    batches = list(score_rows(run_scorer, split, batch_size=5, workers=2))
    assert [len(b.positions) for b in batches] == [5] * 6 + [2]
    whole = collect(batches)
    assert whole.positions.tolist() == list(range(len(split)))
    assert whole.texts == split.texts and set(whole.text_sources) == {"client", "none-optional"}
    for index in range(2):
        shard = collect(score_rows(run_scorer, split, batch_size=4, shard=(index, 2)))
        assert shard.positions.tolist() == list(range(index, len(split), 2))
        np.testing.assert_allclose(shard.logits, whole.logits[index::2], atol=1e-6)


def test_decoding_runs_at_most_a_few_batches_ahead_of_the_model(demo_data):
    split = read_split(Path(demo_data) / "train.csv", demo_data)
    scorer = Counting()
    scored = collect(score_rows(scorer, split, batch_size=4, workers=2))
    assert scored.positions.tolist() == list(range(len(split))) and scored.logits.tolist() == list(range(len(split)))
    assert scorer.most_ahead <= BATCHES_AHEAD * 4 + 4  # memory: a few batches of images, whatever the input's length


def test_an_unreadable_image_leaves_its_row_out_or_stops_with_one_line_per_row(demo_data, tmp_path):
    folder = tmp_path / "rows"
    shutil.copytree(demo_data, folder)
    (folder / "images").joinpath("broken.jpg").write_bytes(b"not an image at all")
    split = read_split(Path(demo_data) / "val.csv", demo_data)
    broken = str(folder / "images" / "broken.jpg")
    split = attrs.evolve(split.subset(range(6)), paths=(*split.paths[:2], Path(broken), *split.paths[3:6]))
    line = f"{split.csv}: row {split.rows[2]}: {broken}: not an image Pillow can read"
    scored = collect(score_rows(Counting(), split, batch_size=2))
    assert scored.positions.tolist() == [0, 1, 3, 4, 5] and scored.bad == (line,)
    with pytest.raises(DataError) as stopped:
        collect(score_rows(Counting(), split, batch_size=2, on_bad_image="error"))
    assert stopped.value.problems == [line, 'set data.on_bad_image = "skip" to leave such images out (counted in results.json)']


def test_rows_without_text_are_read_by_the_runs_ocr_engine(demo_data, tmp_path, registry):
    class TextOnly(Scorer):
        recipe_data = {"train": {"modality": "text_only"}, "data": {"ocr": {"engine": "fake_ocr", "lang": "eng"}},
                       "cache": {"dir": str(tmp_path / "cache")}}
        decision = {"threshold": 0.5, "temperature": 1.0}

        def logits(self, vision_items, texts):
            self.seen = list(texts)
            return np.zeros(len(texts))

    split = read_split(Path(demo_data) / "val.csv", demo_data).subset(range(4))
    split = attrs.evolve(split, texts=("given text", "", "  ", "more"))
    scorer = TextOnly()
    scored = collect(score_rows(scorer, split, registry=registry))
    assert scored.text_sources == ("client", "ocr", "ocr", "client")
    assert scored.texts[0] == "given text" and scored.texts[1].startswith("tone ") and scored.texts[3] == "more"
    assert scorer.seen == list(scored.texts)
    as_given = collect(score_rows(scorer, split, fill_text=False))
    assert as_given.texts == ("given text", "", "", "more") and as_given.text_sources[1] == "none-optional"


def test_a_run_gives_the_pooled_features_of_each_modality_and_a_bundle_says_it_cannot(run_scorer, exported_bundle,
                                                                                         demo_data):
    split = read_split(Path(demo_data) / "test.csv", demo_data).subset(range(3))
    items = [run_scorer.preprocess(run_scorer.load_image(path)) for path in split.paths]
    embedded = run_scorer.embed(items, list(split.texts))
    model = run_scorer.model
    assert set(embedded) == {"vision", "text"}
    assert embedded["vision"].shape == (3, model.vision.out_dim) and embedded["text"].shape == (3, model.text.out_dim)
    assert np.isfinite(embedded["vision"]).all() and embedded["vision"].dtype == np.float32
    streamed = collect_embeddings(score_rows(run_scorer, split, embed=True))
    np.testing.assert_allclose(streamed["vision"], embedded["vision"], atol=1e-6)
    bundle = open_scorer(exported_bundle, device="cpu")
    with pytest.raises(EmbeddingsUnavailable, match="^bundle scorers give no embeddings$"):
        bundle.embed(items, list(split.texts))


def collect_embeddings(batches):
    batches = list(batches)
    return {name: np.concatenate([b.embeddings[name] for b in batches]) for name in batches[0].embeddings}


def test_a_runs_test_split_is_scored_without_filling_the_feature_cache(tiny_recipe, demo_data, tmp_path, registry):
    """Validation reads the cache every epoch; the test split is scored once, in float32 from the raw rows."""
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe
    from mmcore.store.spaces import feature_spaces

    cache = tmp_path / "cache"
    recipe = tiny_recipe(cache={"dir": str(cache)})
    run_training(load_recipe(recipe, registry=registry), recipe_path=recipe, out=tmp_path / "run", registry=registry,
                 progress=False, echo=lambda line: None)
    vision = [space for space in feature_spaces(cache) if space["encoder"] == "fake_cnn"]
    images = {p for name in ("train", "val") for p in read_split(Path(demo_data) / f"{name}.csv", demo_data).paths}
    assert [space["entries"] for space in vision] == [len(images)]  # no test image in it
