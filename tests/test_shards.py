"""WebDataset shards as a data source: ``mmcore shard`` writes them (atomic, verified, resumable),
training from them gives the CSV's predictions, problems name the shard and the sample key, and
torchrun ranks read disjoint shards."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
import tomli_w

from mmcore.data.checks import scan_images
from mmcore.data.memo import FileFacts
from mmcore.data.shards import parse_size, write_shards
from mmcore.data.webdataset import ShardIndex, read_shards
from mmcore.errors import DataError


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _predictions(run_dir):
    return [(p["label"], round(p["score"], 6)) for p in json.loads((run_dir / "test_predictions.json").read_text())]


def test_csv_to_shards_to_train_gives_the_same_predictions(cli, tiny_recipe, demo_data, tmp_path):
    from tiny import tiny_recipe_data

    shards = tmp_path / "shards"
    patterns = {}
    for split in ("train", "val", "test"):
        result = cli("shard", demo_data / f"{split}.csv", "--out", shards, "--size", "100KB")
        patterns[split] = result.stdout.strip().rsplit(": ", 1)[1]
    assert patterns["train"] == str(shards / "train-{000000..000003}.tar")  # 64 images of ~4.4 KB in 100 KB shards

    cache = {"dir": str(tmp_path / "cache")}
    from_csv = tiny_recipe("csv.toml", cache=cache)
    cli("run", from_csv, "--out", tmp_path / "csv-run", "--quiet")
    data = tiny_recipe_data(demo_data, cache=cache, data={"format": "webdataset", **patterns})
    from_shards = tmp_path / "shards.toml"
    from_shards.write_text(tomli_w.dumps(data))
    result = cli("run", from_shards, "--out", tmp_path / "shard-run")

    assert _predictions(tmp_path / "shard-run") == _predictions(tmp_path / "csv-run")
    assert "vision features " in result.stderr and "64/64 from cache" in result.stderr  # keyed by content: shared

    # eval of the shard-trained run reads its test split from the shards, or a CSV when given one
    cli("eval", tmp_path / "shard-run", "--out", tmp_path / "eval-shards", "--quiet")
    cli("eval", tmp_path / "shard-run", "--data", demo_data / "test.csv", "--out", tmp_path / "eval-csv", "--quiet")
    assert _predictions(tmp_path / "eval-shards") == _predictions(tmp_path / "shard-run")
    assert _predictions(tmp_path / "eval-csv") == _predictions(tmp_path / "shard-run")
    assert json.loads((tmp_path / "eval-shards" / "results.json").read_text())["evaluated_csv"] == patterns["test"]


def test_shard_writing_is_resumable_and_gives_the_uninterrupted_result(demo_data, tmp_path, monkeypatch):
    import mmcore.data.shards as shards_module

    whole = write_shards(demo_data / "train.csv", tmp_path / "whole", max_bytes=parse_size("100KB"), echo=lambda line: None)
    real_write = shards_module._write_tar
    calls = []

    def dies_on_the_third(path, samples):
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(path, samples)

    monkeypatch.setattr(shards_module, "_write_tar", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards(demo_data / "train.csv", tmp_path / "resumed", max_bytes=100_000, echo=lambda line: None)
    monkeypatch.setattr(shards_module, "_write_tar", real_write)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["train-000000.tar", "train-000001.tar", "train.shards.json"]

    lines = []
    resumed = write_shards(demo_data / "train.csv", tmp_path / "resumed", max_bytes=100_000, echo=lines.append)
    assert lines[0] == "resuming: 2 of 4 shards already written and verified"
    assert [s["sha1"] for s in resumed["shards"]] == [s["sha1"] for s in whole["shards"]]
    for entry in whole["shards"]:  # byte for byte what an uninterrupted run wrote
        assert (tmp_path / "resumed" / entry["name"]).read_bytes() == (tmp_path / "whole" / entry["name"]).read_bytes()

    (tmp_path / "resumed" / "train-000001.tar").write_bytes(b"changed")
    lines.clear()
    write_shards(demo_data / "train.csv", tmp_path / "resumed", max_bytes=100_000, echo=lines.append)
    assert lines[0] == f"{tmp_path / 'resumed' / 'train-000001.tar'}: missing or changed; writing it again"
    with pytest.raises(DataError, match="written from another CSV or --size"):
        write_shards(demo_data / "train.csv", tmp_path / "resumed", max_bytes=120_000, echo=lines.append)


def test_a_corrupt_sample_is_reported_with_its_shard_and_key(demo_data, tmp_path):
    image = (demo_data / "images").glob("*.jpg").__next__().read_bytes()
    good = _tar(tmp_path / "a-000000.tar", [("s1.jpg", image), ("s1.cls", b"1"), ("s1.txt", b"ad"),
                                             ("s2.jpg", b"\xff\xd8garbage"), ("s2.cls", b"0")])
    bad_label = _tar(tmp_path / "a-000001.tar", [("s3.png", image), ("s3.cls", b"maybe"), ("s4.txt", b"no image")])
    index = ShardIndex(tmp_path / "cache")
    with pytest.raises(DataError) as caught:
        read_shards("train", str(tmp_path / "a-{000000..000001}.tar"), index)
    assert caught.value.problems == [
        f"{bad_label}: sample s4: no image (expected s4.jpg, .png, .webp, ...)",
        f"{bad_label}: sample s3: bad label 'maybe' (expected True/False, 1/0 or true/false)",
    ]

    split = read_shards("train", str(good), index)
    assert scan_images(split, facts=FileFacts()) == [f"{good}: sample s2: not an image Pillow can read"]
    with split.paths[0].open_bytes() as handle:
        assert handle.read() == image  # the sample's bytes, read back by offset

    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(good.read_bytes()[:1200])
    with pytest.raises(DataError, match=rf"^{cut}: damaged or not an uncompressed tar shard after sample s1"):
        read_shards("train", str(cut), ShardIndex(None))


def test_a_warm_start_over_shards_reads_no_shard(demo_data, tmp_path, monkeypatch):
    write_shards(demo_data / "val.csv", tmp_path / "s", max_bytes=100_000, echo=lambda line: None)
    pattern = str(tmp_path / "s" / "val-{000000..000001}.tar")
    cold = ShardIndex(tmp_path / "cache")
    first = read_shards("val", pattern, cold)
    assert len(cold.read_here) == 2 and len(first) == 32

    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("a shard was read on a warm start"))
    warm = ShardIndex(tmp_path / "cache")
    again = read_shards("val", pattern, warm)
    assert warm.read_here == [] and again.paths == first.paths and again.labels == first.labels


def test_pipe_urls_are_read_through_the_command(demo_data, tmp_path):
    write_shards(demo_data / "val.csv", tmp_path / "s", max_bytes=10**9, echo=lambda line: None)
    url = f"pipe:cat {tmp_path / 's' / 'val-000000.tar'}"
    index = ShardIndex(tmp_path / "cache")
    split = read_shards("val", url, index)
    assert len(split) == 32 and index.read_here == [url]
    with split.paths[5].open_bytes() as handle:  # read from the spooled copy
        assert handle.read()[:2] == b"\xff\xd8"


@pytest.mark.slow
def test_two_gloo_ranks_read_disjoint_shards_covering_every_sample_once(demo_data, tmp_path):
    write_shards(demo_data / "train.csv", tmp_path / "s", max_bytes=100_000, echo=lambda line: None)
    pattern = str(tmp_path / "s" / "train-{000000..000003}.tar")
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import torch
        from mmcore.data.webdataset import ShardIndex, read_shards
        from mmcore.dist import init_distributed, rank
        init_distributed()
        index = ShardIndex(None)
        split = read_shards("train", {pattern!r}, index)
        out = {{"read": index.read_here, "samples": [p.url + "#" + p.key for p in split.paths]}}
        with open({str(tmp_path)!r} + f"/rank{{rank()}}.json", "w") as handle:
            json.dump(out, handle)
        torch.distributed.destroy_process_group()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert set(r0["read"]).isdisjoint(r1["read"]) and len(r0["read"]) == len(r1["read"]) == 2
    assert sorted(r0["read"] + r1["read"]) == sorted(str(tmp_path / "s" / f"train-{n:06d}.tar") for n in range(4))
    read_samples = [s for s in r0["samples"] if s.split("#")[0] in r0["read"]] + \
                   [s for s in r1["samples"] if s.split("#")[0] in r1["read"]]
    assert sorted(read_samples) == sorted(set(read_samples)) and len(read_samples) == 64  # every sample once
    assert r0["samples"] == r1["samples"]  # and every rank knows the whole split


# ---------------------------------------------------------------- every input bounded (issue 26)


def _sparse_tar(tmp_path, size):
    """A shard whose ``000.jpg`` is a GNU sparse member of ``size`` zero bytes: 10 KB on disk."""
    import shutil

    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar to write a sparse member")
    folder = tmp_path / "members"
    folder.mkdir()
    with open(folder / "000.jpg", "wb") as handle:
        handle.truncate(size)
    (folder / "000.cls").write_bytes(b"1")
    shard = tmp_path / "sparse-000000.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(shard), "000.jpg", "000.cls"], cwd=folder, check=True)
    return shard


def _refused(shard, index=None):
    """The problem lines reading ``shard`` gives (it must give some)."""
    with pytest.raises(DataError) as caught:
        read_shards("train", str(shard), index or ShardIndex(None))
    return caught.value.problems


def test_a_member_over_max_image_bytes_is_refused_from_its_header_unread(tmp_path, monkeypatch):
    """A 10 KB shard holding a 2 GiB sparse member took 4.7 GB and ended "shorter than its index"."""
    shard = _sparse_tar(tmp_path, 2 << 30)
    assert shard.stat().st_size < 100_000
    read = []
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, member: read.append(member.name))
    assert _refused(shard) == [
        f"{shard}: sample 000: 000.jpg: too large (2147483648 bytes > data.max_image_bytes = 50000000); it is not read"
    ]
    assert read == []


def test_a_sparse_member_within_the_limit_is_refused_too(tmp_path):
    """Its bytes are not at its offset in the tar, where training reads them."""
    shard = _sparse_tar(tmp_path, 1 << 20)
    assert _refused(shard) == [
        f"{shard}: sample 000: 000.jpg is a sparse tar member (tar --sparse); write the shards with mmcore shard"
    ]


def test_a_member_named_twice_for_a_key_is_refused(demo_data, tmp_path):
    """Two 000.cls in one shard: the last silently won."""
    image = next((demo_data / "images").glob("*.jpg")).read_bytes()
    shard = _tar(tmp_path / "dup-000000.tar", [("000.jpg", image), ("000.cls", b"1"), ("000.CLS", b"0")])
    assert _refused(shard) == [
        f"{shard}: sample 000: 000.CLS is in the shard twice (the last would silently win); write each member of a sample once"
    ]


def test_a_remembered_index_is_held_to_a_lowered_limit(demo_data, tmp_path):
    image = next((demo_data / "images").glob("*.jpg")).read_bytes()
    shard = _tar(tmp_path / "s-000000.tar", [("000.jpg", image), ("000.cls", b"1")])
    assert len(read_shards("train", str(shard), ShardIndex(tmp_path / "cache"))) == 1  # indexed and remembered
    lowered = ShardIndex(tmp_path / "cache", max_bytes=len(image) - 1)
    problems = _refused(shard, lowered)
    assert lowered.read_here == []  # the remembered index answered
    assert problems == [
        f"{shard}: sample 000: 000.jpg: too large ({len(image)} bytes > data.max_image_bytes = {len(image) - 1}); it is not read"
    ]


def test_mmcore_shard_refuses_an_image_over_the_limit_unread(demo_data, tmp_path):
    from click.testing import CliRunner

    from mmcore.cli.main import cli

    image = next((demo_data / "images").glob("*.jpg"))
    big = tmp_path / "big.jpg"
    with open(big, "wb") as handle:
        handle.truncate(2 << 30)
    csv = tmp_path / "train.csv"
    csv.write_text(f"local_image_path,label,text_info\n{image},True,\n{big},False,\n")
    result = CliRunner().invoke(cli, ["shard", str(csv), "--out", str(tmp_path / "shards")])
    assert (result.exit_code, result.stderr.splitlines()) == (
        3, [f"{csv}: row 2: image file too large (2147483648 bytes > data.max_image_bytes = 50000000): {big}"]
    )
    small = CliRunner().invoke(cli, ["shard", str(csv), "--out", str(tmp_path / "shards"), "--max-image-bytes", "10"])
    assert small.stderr.splitlines()[0] == (
        f"{csv}: row 1: image file too large ({image.stat().st_size} bytes > data.max_image_bytes = 10): {image}"
    )
