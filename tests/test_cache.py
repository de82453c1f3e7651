"""The on-disk feature cache: keys that miss when they must, resumable and concurrent fills,
memory-mapped reads, the same predictions with and without it, and ``mmcore cache``."""

import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mmcore.cli.cache import cache_group
from mmcore.data.csvs import read_split
from mmcore.engine.features import fill_vision_cache, image_keys, vision_store
from mmcore.engine.pipeline import Pipeline
from mmcore.recipe import recipe_from_dict
from mmcore.store.features import FeatureStore, FeatureView
from mmcore.store.root import cache_root


def make_recipe(registry, cache_dir, *, pooling="mean", vision_params=None, seed=42, enabled=True, **train):
    data = {
        "seed": seed,
        "data": {"base_dir": "", "num_workers": 0},
        "vision": {"name": "fake_cnn", "params": vision_params or {}},
        "text": {"name": "fake_text"},
        "pooling": {"name": pooling},
        "train": {"batch_size": 8, **train},
        "cache": {"enabled": enabled, "dir": str(cache_dir)},
        "logging": {"tensorboard": False, "progress": False},
    }
    return recipe_from_dict(data, registry=registry)


class Counter:
    """Counts the images a vision encoder sees (optionally failing after ``fail_after`` batches)."""

    def __init__(self, encoder, fail_after=None):
        self.images, self.batches, self.fail_after = 0, 0, fail_after
        self.forward = encoder.forward

        def counted(**inputs):
            if self.fail_after is not None and self.batches >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.batches += 1
            self.images += inputs["pixel_values"].shape[0]
            return self.forward(**inputs)

        encoder.forward = counted


def pipeline_for(registry, cache_dir, **kwargs):
    pipeline = Pipeline(make_recipe(registry, cache_dir, **kwargs), registry, progress=False)
    return pipeline, Counter(pipeline.model.vision)


@pytest.fixture
def split(demo_data):
    return read_split(demo_data / "train.csv", demo_data)


@pytest.fixture
def images(tmp_path, demo_data):
    """A private copy of the demo images (tests below rewrite files)."""
    shutil.copytree(demo_data / "images", tmp_path / "data" / "images")
    shutil.copy(demo_data / "train.csv", tmp_path / "data" / "train.csv")
    return tmp_path / "data"


def test_second_pipeline_reads_everything_from_disk_via_memmap(registry, tmp_path, split):
    cache = tmp_path / "cache"
    first, count1 = pipeline_for(registry, cache)
    dataset1, _, _ = first.dataset(split)
    assert count1.images == len(split)
    assert "0/64 from cache" in first.cache_log[0]

    second, count2 = pipeline_for(registry, cache)
    dataset2, split2, errors = second.dataset(split)
    assert count2.images == 0 and errors == [] and len(split2) == len(split)
    assert "64/64 from cache" in second.cache_log[0]
    assert isinstance(dataset2.vision_features, FeatureView)
    row = dataset2.vision_features[5]
    assert isinstance(row, np.memmap) and row.dtype == np.float16
    assert isinstance(dataset2.text_features[5], np.memmap)

    # the cached vector is the pooled encoder output on the same preprocessed image (fp16)
    raw = Pipeline(make_recipe(registry, cache, enabled=False), registry, progress=False)
    raw.model.eval()
    raw_dataset, _, _ = raw.dataset(split)
    item = raw_dataset[5]
    with torch.no_grad():
        pixels = raw.model.vision.preprocessing.normalize(item["vision"]["pixel_values"][None])  # uint8 from the loader
        out = raw.model.vision(pixel_values=pixels)
        expected = raw.model.pooling(out.tokens, out.mask)[0].numpy()
    np.testing.assert_allclose(dataset2[5]["vision_feature"].numpy(), expected, rtol=2e-3, atol=2e-3)
    text = raw.model.text([split.texts[5]])[0].numpy()
    np.testing.assert_allclose(dataset2[5]["text_feature"].numpy(), text, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "change",
    [
        {"vision_params": {"image_size": 48}},  # preprocessing
        {"vision_params": {"width": 24}},  # architecture
        {"seed": 7},  # random weights differ: caught by the weights fingerprint
        {"pooling": "attention"},  # tokens are stored instead of mean vectors
        {"weights_id": "org/other-weights"},  # encoder identity (weights id)
    ],
)
def test_any_change_of_what_computes_the_features_misses(registry, tmp_path, split, change):
    cache = tmp_path / "cache"
    pipeline_for(registry, cache)[0].dataset(split)
    change = dict(change)
    weights_id = change.pop("weights_id", None)
    pipeline, count = pipeline_for(registry, cache, **change)
    if weights_id:
        pipeline.model.vision.weights = weights_id
    pipeline.dataset(split)
    assert count.images == len(split)
    # and the unchanged recipe still hits
    again, count = pipeline_for(registry, cache)
    again.dataset(split)
    assert count.images == 0


def test_image_bytes_decide_not_paths_or_timestamps(registry, tmp_path, images):
    cache = tmp_path / "cache"
    split = read_split(images / "train.csv", images)
    pipeline_for(registry, cache)[0].dataset(split)
    paths = list(split.paths)

    # new bytes -> recomputed, even with the same size and the old mtime put back
    target = paths[3]
    st = os.stat(target)
    data = bytearray(target.read_bytes())
    table = data.index(b"\xff\xdb") + 5  # a quantization table value: still a valid JPEG
    data[table + 10] = (data[table + 10] % 250) + 3
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(target).st_size == st.st_size and os.stat(target).st_mtime_ns == st.st_mtime_ns
    pipeline, count = pipeline_for(registry, cache)
    pipeline.dataset(split)
    assert count.images == 1

    # same bytes, new timestamps (touch) or a copy elsewhere -> reused
    os.utime(paths[4], ns=(1, 1))
    copy = tmp_path / "copy"
    shutil.copytree(images, copy)
    pipeline, count = pipeline_for(registry, cache)
    pipeline.dataset(split)
    pipeline.dataset(read_split(copy / "train.csv", copy))
    assert count.images == 0


def test_killed_fill_resumes_with_only_the_rest(registry, tmp_path, split):
    cache = tmp_path / "cache"
    pipeline, count = pipeline_for(registry, cache)
    store = vision_store(cache, pipeline.model, dtype=None, pooling_spec="mean")
    keys = image_keys(cache, split)
    args = dict(batch_size=8, device=torch.device("cpu"), dtype=None, num_workers=0, max_image_pixels=10**8, progress=False)
    count.fail_after = 3
    with pytest.raises(KeyboardInterrupt):
        fill_vision_cache(pipeline.model, split, store, keys, chunk_rows=8, **args)
    assert count.images == 24
    count.fail_after = None
    fresh = FeatureStore(cache, store.description)
    assert len(fresh.missing(keys)) == len(split) - 24
    _, _, computed = fill_vision_cache(pipeline.model, split, fresh, keys, chunk_rows=8, **args)
    assert computed == len(split) - 24 and count.images == len(split)
    assert fresh.missing(keys, refresh=True) == []


def test_sharded_fills_cover_disjoint_parts(registry, tmp_path, split):
    cache = tmp_path / "cache"
    pipeline, count = pipeline_for(registry, cache)
    store = vision_store(cache, pipeline.model, dtype=None, pooling_spec="mean")
    keys = image_keys(cache, split)
    args = dict(batch_size=8, device=torch.device("cpu"), dtype=None, num_workers=0, max_image_pixels=10**8, progress=False)
    done = [fill_vision_cache(pipeline.model, split, store, keys, shard=(r, 3), **args)[2] for r in range(3)]
    assert sum(done) == len(split) and max(done) - min(done) <= 1
    assert count.images == len(split) and store.missing(keys, refresh=True) == []


def _concurrent_fill(cache, data_dir, queue):
    import mmcore_fake_encoders

    from mmcore.plugins.manager import make_registry

    registry = make_registry(load_entrypoints=False, extra_plugins=[("fake", mmcore_fake_encoders)])
    split = read_split(os.path.join(data_dir, "train.csv"), data_dir)
    pipeline, count = pipeline_for(registry, cache, pooling="attention")
    dataset, _, _ = pipeline.dataset(split)
    queue.put((count.images, [np.asarray(dataset.vision_features[i]).tolist() for i in range(len(split))]))


def test_two_concurrent_fills_make_one_correct_cache(registry, tmp_path, split, demo_data):
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_concurrent_fill, args=(cache, str(demo_data), queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert sorted(images for images, _ in results) == [0, len(split)]  # the second waited, then reused
    assert results[0][1] == results[1][1]
    # one entry per image, every chunk readable, values = a fresh computation
    pipeline, count = pipeline_for(registry, cache, pooling="attention")
    dataset, _, _ = pipeline.dataset(split)
    assert count.images == 0
    store = pipeline._stores["vision"]
    assert len(store.index(refresh=True)) == len(split)
    reference, _ = pipeline_for(registry, tmp_path / "other", pooling="attention")
    ref_dataset, _, _ = reference.dataset(split)
    for i in range(len(split)):
        np.testing.assert_array_equal(np.asarray(dataset.vision_features[i]), np.asarray(ref_dataset.vision_features[i]))


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_cached_and_uncached_training_predict_the_same(registry, tmp_path, demo_data, pooling, monkeypatch):
    from mmcore.commands.run import run_training
    from mmcore.engine import outputs

    # plots and the HTML report take most of a tiny run and do not touch predictions
    monkeypatch.setattr(outputs, "write_plots", lambda *a, **k: {})
    monkeypatch.setattr(outputs, "write_html_report", lambda *a, **k: None)

    scores = {}
    for enabled in (False, True):
        recipe = make_recipe(
            registry, tmp_path / "cache", pooling=pooling, enabled=enabled, epochs=2, learning_rate=3e-3
        )
        recipe = recipe_from_dict(
            {**_as_dict(recipe), "data": {"base_dir": str(demo_data), "num_workers": 0}}, registry=registry
        )
        out = tmp_path / f"run-{enabled}"
        run_training(recipe, recipe_path="r.toml", out=out, registry=registry, progress=False, echo=lambda *_: None)
        records = json.loads((out / "test_predictions.json").read_text())
        scores[enabled] = np.array([r["score"] for r in records])
        results = json.loads((out / "results.json").read_text())
        assert results["feature_cache"]["vision"] is enabled
    assert len(scores[True]) == 32
    np.testing.assert_allclose(scores[True], scores[False], atol=5e-3)
    assert np.std(scores[True]) > 1e-3  # the model did learn something sample-specific


def _as_dict(recipe):
    from mmcore.recipe import recipe_to_dict

    return recipe_to_dict(recipe)


def test_cache_info_and_clear(registry, tmp_path, split, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MMCORE_CACHE_DIR", str(cache))
    assert cache_root("") == cache
    pipeline_for(registry, "")[0].dataset(split)  # "" -> $MMCORE_CACHE_DIR
    runner = CliRunner()
    result = runner.invoke(cache_group, ["info"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"cache directory {cache}"
    vision_line = next(line for line in lines if line.startswith("fake_cnn"))
    assert "64 entries" in vision_line and "vector" in vision_line
    text_line = next(line for line in lines if line.startswith("fake_text"))
    assert f"{len(set(split.texts))} entries" in text_line

    assert runner.invoke(cache_group, ["clear"]).exit_code != 0  # --all or --encoder needed
    result = runner.invoke(cache_group, ["clear", "--encoder", "fake_cnn"])
    assert result.exit_code == 0 and "removed 1 feature spaces" in result.output
    output = runner.invoke(cache_group, ["info"]).output
    assert "fake_cnn" not in output and "fake_text" in output
    pipeline, count = pipeline_for(registry, "")
    pipeline.dataset(split)
    assert count.images == len(split)  # cleared entries are recomputed

    result = runner.invoke(cache_group, ["clear", "--all"])
    assert "removed 2 feature spaces" in result.output
    assert runner.invoke(cache_group, ["info"]).output.splitlines()[1] == "empty"


# ---------------------------------------------------------------- a cache that heals and degrades


def _space_files(cache):
    """The vision feature space's directory, its (only) chunk index and data file."""
    (space,) = [p for p in (cache / "v1" / "features").iterdir() if '"fake_cnn"' in (p / "meta.json").read_text()]
    (index,) = space.glob("*.index.npy")
    return space, index, index.with_name(index.name.replace(".index.npy", ".npy"))


def test_truncated_chunk_is_dropped_with_one_warning_and_recomputed(registry, tmp_path, split, capsys):
    cache = tmp_path / "cache"
    first, _ = pipeline_for(registry, cache)
    before = [np.asarray(first.dataset(split)[0].vision_features[i]).tolist() for i in range(len(split))]
    _, index, data = _space_files(cache)
    size = data.stat().st_size
    with open(data, "r+b") as handle:  # the case: `mmap length is greater than file size`
        handle.truncate(size - 100)
    capsys.readouterr()

    second, count = pipeline_for(registry, cache)
    dataset, _, errors = second.dataset(split)
    assert errors == [] and count.images == len(split)  # the whole chunk was recomputed
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: feature cache: dropped damaged chunk {data} ({size - 100} bytes, its header needs {size}); "
        "its entries are recomputed"
    ]
    assert [np.asarray(dataset.vision_features[i]).tolist() for i in range(len(split))] == before
    assert not index.exists()  # the damaged pair is gone; a new sound chunk replaced it


def test_index_pointing_past_its_chunk_is_dropped(registry, tmp_path, split, capsys):
    from mmcore.store.chunks import check_chunk

    cache = tmp_path / "cache"
    pipeline_for(registry, cache)[0].dataset(split)
    space, index, data = _space_files(cache)
    records = np.load(index)
    records["offset"][-1] = 1000  # a row the data file does not have
    np.save(index, records)
    chunk = index.name[: -len(".index.npy")]
    assert check_chunk(space, chunk)[1] == (data, f"{len(split)} rows, its index needs 1001")
    pipeline, count = pipeline_for(registry, cache)
    pipeline.dataset(split)
    assert count.images == len(split)
    assert f"warning: feature cache: dropped damaged chunk {data} ({len(split)} rows, its index needs 1001)" in capsys.readouterr().err


def test_damaged_file_hash_records_are_dropped_and_rehashed(registry, tmp_path, split, capsys):
    from mmcore.store.records import FileHashes, read_records

    cache = tmp_path / "cache"
    keys = FileHashes(cache).keys(split.paths)
    (records,) = (cache / "v1" / "files").glob("*.npy")
    data = bytearray(records.read_bytes())
    data[-5] ^= 0xFF  # one sha1 byte changed: np.load still reads it, the checksum in the name does not match
    records.write_bytes(bytes(data))
    assert FileHashes(cache).keys(split.paths) == keys  # hashed again from the images, not the bad record
    assert capsys.readouterr().err.splitlines() == [
        f"warning: feature cache: dropped damaged file-hash records {records} "
        "(contents do not match the checksum in its name); those images are hashed again"
    ]
    assert read_records(records)[1] is None  # the same records written again (same name: same contents)


def test_cache_verify_lists_damage_and_repair_removes_it(registry, tmp_path, split):
    cache = tmp_path / "cache"
    pipeline_for(registry, cache)[0].dataset(split)
    space, index, data = _space_files(cache)
    data.write_bytes(data.read_bytes()[:-10])
    orphan = space / "0123456789abcdef0123456789abcdef.npy"  # a fill killed between data and index
    np.save(orphan, np.zeros((2, 8), np.float16))
    tmp = space / f".{orphan.name}~{os.uname().nodename}~999999999~abc.tmp"  # its writer is gone
    tmp.write_bytes(b"partial")
    old = os.stat(orphan).st_mtime - 3600
    os.utime(orphan, (old, old))
    runner = CliRunner()
    result = runner.invoke(cache_group, ["verify", "--dir", str(cache)])
    assert result.exit_code == 1
    size = data.stat().st_size
    assert result.output.splitlines()[:3] == [
        f"{data}: damaged chunk ({size} bytes, its header needs {size + 10})",
        f"{orphan}: data file without an index (a fill killed before its commit)",
        f"{tmp}: temporary file of an interrupted write",
    ]
    assert result.output.splitlines()[-1].endswith("3 problems")
    result = runner.invoke(cache_group, ["verify", "--repair", "--dir", str(cache)])
    assert result.exit_code == 0 and result.output.splitlines()[-1].endswith("3 problems, 4 files removed")
    assert not data.exists() and not index.exists() and not orphan.exists() and not tmp.exists()
    result = runner.invoke(cache_group, ["verify", "--dir", str(cache)])
    assert result.exit_code == 0 and result.output.splitlines() == [
        f"checked {cache}: 2 feature spaces, 1 sound chunks ({len(set(split.texts))} entries), 1 file-hash records, "
        "0 image-check records, 0 OCR texts, 0 teacher-logit record files; 0 problems"
    ]


def test_swapped_chunk_files_are_caught_by_verify_and_a_run_recomputes_them(registry, tmp_path, split, capsys):
    """Issue 26: two same-shaped chunk files swapped passed `verify --repair` with 0 problems, and the
    run served one image's features for another's."""
    cache = tmp_path / "cache"
    pipeline, count = pipeline_for(registry, cache)
    store = pipeline._vision_store()  # the run's own space
    keys = image_keys(cache, split)
    args = dict(batch_size=8, device=torch.device("cpu"), dtype=None, num_workers=0, max_image_pixels=10**8, progress=False)
    fill_vision_cache(pipeline.model, split, store, keys, chunk_rows=8, **args)  # 8 chunks of 8 images
    truth = store.view(keys)
    before = [np.asarray(truth[i]).tolist() for i in range(len(split))]
    first, second = sorted(store.dir.glob("*.index.npy"))[:2]
    data = [index.with_name(index.name.replace(".index.npy", ".npy")) for index in (first, second)]
    a, b = data[0].read_bytes(), data[1].read_bytes()
    data[0].write_bytes(b)
    data[1].write_bytes(a)

    result = CliRunner().invoke(cache_group, ["verify", "--dir", str(cache)])
    assert result.exit_code == 1
    swapped = "damaged chunk (its index is not the one it was sealed with (chunk files swapped or copied))"
    assert result.output.splitlines()[:2] == [f"{data[0]}: {swapped}", f"{data[1]}: {swapped}"]
    assert result.output.splitlines()[-1].endswith("; 2 problems")

    capsys.readouterr()
    again, count = pipeline_for(registry, cache)
    dataset, _, errors = again.dataset(split)
    assert errors == [] and count.images == 16  # the two chunks' images computed again, the rest reused
    assert [np.asarray(dataset.vision_features[i]).tolist() for i in range(len(split))] == before
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: feature cache: dropped damaged chunk {path} ({swapped[15:-1]}); its entries are recomputed"
                        for path in data]


def test_a_swapped_meta_json_is_detected_and_written_again(registry, tmp_path, split, capsys):
    """Issue 26: a space's meta.json was never checked against its key, so a swapped one made verify
    judge the space's chunks by another space's description and info name the wrong encoder."""
    cache = tmp_path / "cache"
    pipeline_for(registry, cache)[0].dataset(split)
    vision, text = sorted((cache / "v1" / "features").iterdir(), key=lambda p: '"fake_cnn"' not in (p / "meta.json").read_text())
    vision_meta, text_meta = (vision / "meta.json").read_bytes(), (text / "meta.json").read_bytes()
    (vision / "meta.json").write_bytes(text_meta)
    (text / "meta.json").write_bytes(vision_meta)

    result = CliRunner().invoke(cache_group, ["verify", "--dir", str(cache)])
    assert result.exit_code == 1
    assert sorted(result.output.splitlines()[:2]) == sorted([
        f"{vision / 'meta.json'}: describes another feature space ({text.name})",
        f"{text / 'meta.json'}: describes another feature space ({vision.name})",
    ])
    info = CliRunner().invoke(cache_group, ["info", "--dir", str(cache)]).output
    assert "fake_cnn" not in info and "fake_text" not in info  # neither encoder is named from the other's file
    assert f"identity ? (meta.json: describes another feature space ({text.name}); see mmcore cache verify)" in info

    capsys.readouterr()
    again, count = pipeline_for(registry, cache)
    again.dataset(split)
    assert count.images == 0  # the chunks are sealed for their own space: still used
    warnings = sorted(line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:"))
    assert warnings == sorted([
        f"warning: feature cache: {vision / 'meta.json'}: describes another feature space ({text.name}); "
        "written again from this run's description",
        f"warning: feature cache: {text / 'meta.json'}: describes another feature space ({vision.name}); "
        "written again from this run's description",
    ])
    assert CliRunner().invoke(cache_group, ["verify", "--dir", str(cache)]).exit_code == 0


def _full_disk_on_chunks(monkeypatch):
    import errno

    from mmcore import io as io_module

    real = io_module.os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".npy") and "features" in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(io_module.os, "replace", replace)


def test_a_full_cache_disk_is_one_warning_and_the_run_goes_on_without_it(registry, tmp_path, split, capsys, monkeypatch):
    cache = tmp_path / "cache"
    _full_disk_on_chunks(monkeypatch)  # the probe passes; the disk fills while the first chunk is written
    pipeline, count = pipeline_for(registry, cache)
    dataset, split2, errors = pipeline.dataset(split)
    assert dataset.vision_features is None and dataset.text_features is None and dataset.needs_image
    assert len(split2) == len(split) and errors == []
    assert not pipeline.cache_vision and not pipeline.cache_text
    line = f"{cache}: feature cache: no space left on device; free some space or choose another disk"
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
    assert warnings == [f"warning: {line}; continuing without the feature cache (cache.required = true would stop here)"]
    assert dataset[3]["vision"]["pixel_values"].shape[0] == 3  # images are decoded online instead
    assert not list(cache.rglob("*.tmp"))


def test_a_read_only_cache_with_cache_required_stops_with_one_line(registry, tmp_path, split, monkeypatch):
    import errno

    from mmcore.store import root as root_module
    from mmcore.store.root import CacheUnavailable

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(root_module.Path, "mkdir", read_only)
    recipe = recipe_from_dict(
        {**_as_dict(make_recipe(registry, tmp_path / "cache")), "cache": {"dir": str(tmp_path / "cache"), "required": True}},
        registry=registry,
    )
    pipeline = Pipeline(recipe, registry, progress=False)
    with pytest.raises(CacheUnavailable) as info:
        pipeline.dataset(split)
    assert str(info.value) == f"{tmp_path / 'cache'}: feature cache: read-only file system; choose a path on a writable disk"
    assert info.value.exit_code == 4


def test_keys_ending_in_a_nul_byte_are_found_again(tmp_path, monkeypatch):
    """numpy's S20 fields drop trailing NUL bytes: 1 image in 256 was hashed and encoded again each run."""
    import hashlib
    import itertools

    import mmcore.store.records as records_module
    from mmcore.store.keys import stat_key
    from mmcore.store.records import FileHashes

    content = next(b for b in (str(i).encode() for i in itertools.count()) if hashlib.sha1(b).digest()[-1] == 0)
    for i in itertools.count():  # a file whose stat key ends in NUL as well
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(content)
        if stat_key(path)[-1] == 0:
            break
        path.unlink()
    root = tmp_path / "cache"
    [key] = FileHashes(root).keys([path])
    assert key == hashlib.sha1(content).digest()

    monkeypatch.setattr(records_module, "file_sha1", lambda path: pytest.fail("hashed again"))
    assert FileHashes(root).keys([path]) == [key]  # stat key and sha1 both found in the records
    store = FeatureStore(root, {"kind": "test"})
    writer = store.writer()
    writer.add(key, np.zeros(4))
    writer.flush()
    assert FeatureStore(root, {"kind": "test"}).missing([key], refresh=True) == []
