"""A run start at scale: checks remembered by stat key (a warm start reads no image), the cache
sized against the free space before a pass, and the compact token storage forms."""

import builtins
import collections
import os
import shutil

import numpy as np
import pytest

from mmcore.commands.run import _check_images
from mmcore.data.csvs import read_split
from mmcore.data.memo import FileFacts, ImageHashes
from mmcore.engine.pipeline import Pipeline
from mmcore.recipe import recipe_from_dict
from mmcore.store.features import FeatureStore
from mmcore.store.space import CacheTooSmall
from mmcore.store.spaces import feature_spaces
from mmcore.store.tokens import dequantize_int8, pool_tokens, quantize_int8


def _recipe(registry, data_dir, cache_dir, **cache):
    return recipe_from_dict(
        {
            "data": {"base_dir": str(data_dir), "num_workers": 0},
            "vision": {"name": "fake_cnn"},
            "text": {"name": "fake_text"},
            "pooling": {"name": "attention"},
            "train": {"batch_size": 8},
            "cache": {"dir": str(cache_dir), **cache},
            "logging": {"tensorboard": False, "progress": False},
        },
        registry=registry,
    )


@pytest.fixture
def data(tmp_path, demo_data):
    """A private copy of the demo data whose test split repeats one training image (a leak)."""
    root = tmp_path / "data"
    shutil.copytree(demo_data, root)
    lines = (root / "test.csv").read_text().splitlines()
    first_train = (root / "train.csv").read_text().splitlines()[1].split(",")[0]
    lines[1] = ",".join([first_train, *lines[1].split(",")[1:]])
    (root / "test.csv").write_text("\n".join(lines) + "\n")
    return root


def _splits(root):
    return {name: read_split(root / f"{name}.csv", root) for name in ("train", "val", "test")}


class _NoImageReads:
    """Fails any open of an image file (builtins.open, PIL.Image.open, the hash function) and counts its stats."""

    def __init__(self, monkeypatch, root):
        import PIL.Image

        import mmcore.io

        self.root, self.stats = str(root), {}
        real_open, real_stat = builtins.open, os.stat

        def guarded_open(path, *args, **kwargs):
            if str(path).startswith(self.root) and str(path).endswith(".jpg"):
                raise AssertionError(f"image read on a warm start: {path}")
            return real_open(path, *args, **kwargs)

        def counted_stat(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and str(path).startswith(self.root) and str(path).endswith(".jpg"):
                self.stats[str(path)] = self.stats.get(str(path), 0) + 1
            return real_stat(path, *args, **kwargs)

        def no_pillow(*args, **kwargs):
            raise AssertionError("PIL.Image.open on a warm start")

        def no_hash(*args, **kwargs):
            raise AssertionError("file hashed on a warm start")

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(os, "stat", counted_stat)
        monkeypatch.setattr(PIL.Image, "open", no_pillow)
        monkeypatch.setattr(mmcore.io, "file_sha1", no_hash)


def test_a_warm_start_stats_each_image_once_and_reads_none(registry, data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    recipe = _recipe(registry, data, cache)
    splits = _splits(data)
    files = {str(p) for split in splits.values() for p in split.paths}

    cold = ImageHashes.for_recipe(recipe)
    duplicates = _check_images(recipe, splits, lambda line: None, cold)
    assert cold.facts.examined == len(files)  # every file read once: hash and header scan share the read
    assert duplicates.counts()["test_in_train"] == 1

    guard = _NoImageReads(monkeypatch, data)  # the whole warm start: the CSV read and the checks
    splits = _splits(data)
    warm = ImageHashes.for_recipe(recipe)
    lines = []
    duplicates = _check_images(recipe, splits, lines.append, warm)
    monkeypatch.undo()
    assert warm.facts.examined == 0
    assert duplicates.counts()["test_in_train"] == 1  # the leak found from the remembered hashes
    assert any("also appears in train.csv" in line for line in lines)
    rows_per_file = collections.Counter(str(p) for split in splits.values() for p in split.paths)
    assert guard.stats == dict(rows_per_file)  # one stat per row (the CSV read's, reused by the checks)
    assert warm(sorted(files)) == cold(sorted(files))  # the same content keys (the feature cache's too)


def test_a_changed_file_is_scanned_again_and_its_problem_reported(registry, data, tmp_path):
    cache = tmp_path / "cache"
    recipe = _recipe(registry, data, cache)
    split = read_split(data / "train.csv", data)
    FileFacts(cache, recipe.data.image_formats)(split.paths)

    victim = split.paths[3]
    victim.write_bytes(b"not an image at all")
    facts = FileFacts(cache, recipe.data.image_formats)
    from mmcore.data.checks import scan_images

    assert scan_images(split, facts=facts) == [
        f"{split.csv}: row {split.rows[3]}: {victim}: not an image Pillow can read"
    ]
    assert facts.examined == 1  # only the changed file (a new stat key) was read
    again = FileFacts(cache, recipe.data.image_formats)
    assert scan_images(split, facts=again) == scan_images(split, facts=facts) and again.examined == 0


def test_the_size_limit_applies_to_remembered_sizes_without_a_rescan(data, tmp_path):
    split = read_split(data / "train.csv", data)
    FileFacts(tmp_path / "cache")(split.paths)
    facts = FileFacts(tmp_path / "cache")
    from mmcore.data.checks import scan_images

    lines = scan_images(split, max_pixels=100, facts=facts)
    assert len(lines) == len(split) and facts.examined == 0
    assert lines[0].endswith("image too large (48x48 = 2304 pixels > data.max_image_pixels = 100)")


def test_a_pass_beyond_the_free_space_is_refused_with_one_line(registry, data, tmp_path, monkeypatch):
    import mmcore.store.space as space_module

    cache = tmp_path / "cache"
    monkeypatch.setattr(space_module, "free_bytes", lambda root: 10_000)
    pipeline = Pipeline(_recipe(registry, data, cache), registry, progress=False)
    split = read_split(data / "train.csv", data)
    with pytest.raises(CacheTooSmall) as caught:
        pipeline.dataset(split)
    # 64 images x 16 tokens x 16 values x 2 bytes (+ 32 index bytes each) = 34.0 KiB > 9.8 KiB
    assert str(caught.value) == (
        f"feature cache {cache}: vision features of 64 images of train.csv (fp16) needs 34.0 KiB "
        f"(64 entries x 512 B), 9.8 KiB free; options: cache.token_storage = \"int8\" (18.0 KiB) or "
        f"\"pooled\" (8.0 KiB), another cache.dir with room, or cache.enabled = false"
    )
    space = pipeline._vision_store().dir
    assert not list(space.glob("*.npy"))  # nothing was written


def test_int8_tokens_round_trip_within_their_bound_and_change_the_identity(registry, data, tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(50, 64)).astype(np.float32) * rng.uniform(0.01, 10, size=(50, 1)).astype(np.float32)
    stored = quantize_int8(tokens)
    assert stored.dtype == np.int8 and stored.shape == (50, 66)
    error = np.abs(dequantize_int8(stored) - tokens).max(axis=1)
    bound = np.abs(tokens).max(axis=1) * (1 / 254 + 1 / 1024)
    assert (error <= bound).all()

    pooled = pool_tokens(tokens[:17], has_cls_token=True)  # CLS + a 4x4 grid -> CLS + 2x2
    assert pooled.shape == (5, 64)
    np.testing.assert_allclose(pooled[0], tokens[0])
    np.testing.assert_allclose(pooled[1], tokens[[1, 2, 5, 6]].mean(axis=0), rtol=1e-6)

    keys = {}
    for form in ("fp16", "int8", "pooled"):
        pipeline = Pipeline(_recipe(registry, data, tmp_path / "cache", token_storage=form), registry, progress=False)
        keys[form] = pipeline._vision_store()
    assert len({store.key for store in keys.values()}) == 3
    assert "token_storage" not in keys["fp16"].description  # fp16 spaces keep the key they had

    # through a real pass: int8 features read back close to fp16 ones, the int8 space ~half the bytes
    split = read_split(data / "train.csv", data)
    views = {}
    for form in ("fp16", "int8"):
        pipeline = Pipeline(_recipe(registry, data, tmp_path / "cache", token_storage=form), registry, progress=False)
        dataset, _, _ = pipeline.dataset(split)
        views[form] = dataset.vision_features
    for i in (0, 17):
        a, b = np.asarray(views["fp16"][i], np.float32), np.asarray(views["int8"][i], np.float32)
        assert a.shape == b.shape and np.abs(a - b).max() <= np.abs(a).max() / 100
    sizes = {space["token_storage"]: space["bytes_per_entry"] for space in feature_spaces(tmp_path / "cache")}
    assert sizes["int8"] < 0.6 * sizes["fp16"]


def test_cache_info_shows_each_space_with_its_size_and_the_free_space(registry, data, tmp_path):
    from click.testing import CliRunner

    from mmcore.cli.cache import cache_group

    pipeline = Pipeline(_recipe(registry, data, tmp_path / "cache"), registry, progress=False)
    pipeline.dataset(read_split(data / "train.csv", data))
    result = CliRunner().invoke(cache_group, ["info", "--dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    space = FeatureStore(tmp_path / "cache", pipeline._vision_store().description)
    line = next(line for line in result.output.splitlines() if line.startswith("fake_cnn"))
    assert "tokens" in line and "64 entries" in line and "/entry" in line and space.key in line
    assert "free on that disk" in result.output
