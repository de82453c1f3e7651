"""`mmcore predict --nproc N`: torchrun ranks score chunks of the input, joined in input order, resumable
after a kill; Parquet in and out (mmcore/commands/predict_ranks.py, mmcore/scoring/tables.py)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import mmcore_cli

from mmcore.cli.predict import predict_command
from mmcore.commands import predict_ranks
from mmcore.commands.predict import predict_csv
from mmcore.commands import predict_parts
from mmcore.commands.predict_parts import MANIFEST, parts_folder
from mmcore.commands.predict_ranks import predict_in_ranks, rank_device
from mmcore.errors import MmcoreError, RunError

COLUMNS = ("score", "calibrated_score", "prediction")


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _repeated_test_csv(demo_data, path, times):
    """The demo test split ``times`` over (relative image paths: read with --base-dir demo_data)."""
    return _write_rows(path, _rows(Path(demo_data) / "test.csv") * times)


def _run_scores(run_dir):
    """``{image path: (score, calibrated_score, prediction)}`` the run gave its test split (as predict scores)."""
    return {row["path"]: (row["score"], row["calibrated_score"], str(row["prediction"]))
            for row in json.loads((Path(run_dir) / "test_predictions.json").read_text())}


def _check_scores(out_rows, input_rows, run_dir):
    """The output keeps the input's rows in order, each with the run's own score for its image."""
    expected = _run_scores(run_dir)
    assert [r["local_image_path"] for r in out_rows] == [r["local_image_path"] for r in input_rows]
    for row in out_rows:
        score, calibrated, prediction = expected[row["local_image_path"]]
        assert float(row["score"]) == pytest.approx(score, abs=1e-6)
        assert float(row["calibrated_score"]) == pytest.approx(calibrated, abs=1e-6)
        assert row["prediction"] == prediction


def _decision(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())["decision"]


@pytest.mark.slow
def test_two_processes_score_as_one_in_input_order(exportable_run, demo_data, tmp_path):
    rows = _rows(Path(demo_data) / "test.csv")
    given = _write_rows(tmp_path / "new.csv", rows[::-1])  # not the run's order
    one = tmp_path / "one.csv"  # one process: the same code without torchrun (what `--nproc 1` runs in its one rank)
    lines = []
    predict_in_ranks(exportable_run, given, one, chunk_rows=5, base_dir=demo_data, progress=False, echo=lines.append)
    out = tmp_path / "two.csv"
    result = mmcore_cli("predict", exportable_run, given, "-o", out, "--base-dir", demo_data, "--nproc", 2,
                        "--chunk-rows", 5, "--quiet")
    two = _rows(out)
    assert two == _rows(one)  # every column, every digit, the same order
    _check_scores(two, rows[::-1], exportable_run)
    positives = sum(r["prediction"] == "True" for r in two)
    said = (f"in 7 chunks of 5 rows (7 scored now): {positives} predicted positive "
            f"(calibrated_score >= {_decision(exportable_run)['threshold']:.4f})")
    assert lines == [f"scored 32 of 32 rows of {given} on cpu {said}", f"wrote {one}"]
    assert f"scored 32 of 32 rows of {given} on 2 processes (rank 0 on cpu) {said}\nwrote {out}\n" in result.stdout
    assert not parts_folder(out).exists()  # the chunks go once the output is written


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_predict_resumes_without_scoring_its_finished_chunks_again(exportable_run, demo_data, tmp_path):
    given = _repeated_test_csv(demo_data, tmp_path / "many.csv", 40)  # 1280 rows, 80 chunks of 16
    out = tmp_path / "scored.csv"
    parts = parts_folder(out)
    args = ["predict", str(exportable_run), str(given), "-o", str(out), "--base-dir", str(demo_data), "--nproc", "2",
            "--chunk-rows", "16", "--quiet"]
    job = subprocess.Popen([sys.executable, "-m", "mmcore", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(parts.glob("chunk-*.npz"))) < 4 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_tree(job.pid)  # the launcher, torchrun and both ranks (each in a session of its own), mid-way
    job.wait()
    kept = sorted(parts.glob("chunk-*.npz"))
    assert not out.exists() and 4 <= len(kept) < 80

    # the kept chunks are read, not scored again: one of them, altered, comes out as altered
    probe = kept[len(kept) // 2]
    altered = int(probe.name[len("chunk-"):-len(".npz")])
    with np.load(probe) as data:
        positions, bad = data["positions"], data["bad"]
    with open(probe, "wb") as handle:
        np.savez(handle, positions=positions, logits=np.zeros(len(positions)), bad=bad)

    result = mmcore_cli(*args)
    assert (f"resuming: {len(kept)} of 80 chunks were scored before and are kept ({parts}); {80 - len(kept)} to score"
            in result.stdout)
    assert f"in 80 chunks of 16 rows ({80 - len(kept)} scored now)" in result.stdout
    rows = _rows(out)
    window = slice(altered * 16, (altered + 1) * 16)
    assert [(r["score"], r["calibrated_score"]) for r in rows[window]] == [("0.5", "0.5")] * 16
    # every other row as one process scores it, in the input's order
    others = lambda table: table[:window.start] + table[window.stop:]  # noqa: E731
    _check_scores(others(rows), others(_rows(given)), exportable_run)
    assert not parts.exists()


def _kill_tree(pid, timeout=30):
    """SIGKILL ``pid`` and every process below it at once (as a lost machine stops), and wait until they are gone."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*"):
            try:
                tree += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
        index += 1
    assert len(tree) >= 4, tree  # the launcher, torchrun, two ranks
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(member) for member in tree):
        assert time.monotonic() < deadline, tree
        time.sleep(0.05)


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_parquet_in_and_out(exportable_run, demo_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(Path(demo_data) / "test.csv")
    table = pa.table({
        "local_image_path": [r["local_image_path"] for r in rows],
        "label": [r["label"] == "True" for r in rows],  # a boolean column, as a data lake has it
        "text_info": [r["text_info"] for r in rows],
        "ad_id": list(range(100, 100 + len(rows))),  # the user's own column, kept with its type
    })
    given = tmp_path / "new.parquet"
    pq.write_table(table, given)

    out = tmp_path / "scored.parquet"
    summary = predict_csv(exportable_run, given, out, base_dir=demo_data, progress=False, echo=lambda line: None)
    scored = pq.read_table(out)
    assert scored.column_names == ["local_image_path", "label", "text_info", "ad_id", *COLUMNS]
    assert [str(t) for t in scored.schema.types] == ["string", "bool", "string", "int64", "double", "double", "bool"]
    assert scored.column("ad_id").to_pylist() == list(range(100, 132))
    as_text = [{"local_image_path": path, "score": repr(score), "calibrated_score": repr(calibrated),
                "prediction": str(prediction)} for path, score, calibrated, prediction in
               zip(*(scored.column(name).to_pylist() for name in ("local_image_path", *COLUMNS)))]
    _check_scores(as_text, rows, exportable_run)
    assert summary.scored == 32

    # by chunks (the --nproc path, here in one process): Parquet in, CSV out, the same scores to the last digit
    # (chunks of a multiple of the batch size: the same batches; a text encoder pads a batch to its longest text)
    chunked = tmp_path / "chunked.csv"
    predict_in_ranks(exportable_run, given, chunked, chunk_rows=16, base_dir=demo_data, progress=False,
                     echo=lambda line: None)
    assert [{k: r[k] for k in ("local_image_path", *COLUMNS)} for r in _rows(chunked)] == as_text


def test_a_parquet_input_is_bounded_and_checked_in_one_line(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcore.errors import DataError
    from mmcore.scoring import tables

    given = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"local_image_path": ["a.jpg"] * 1000, "text": ["x"] * 1000}), given)
    with pytest.raises(DataError) as error:
        tables.read_input(given)
    assert str(error.value) == f"{given}: missing column 'text_info' (found: local_image_path, text); rename 'text' to 'text_info'"

    # its pages uncompressed (from its metadata: no column read), then its text once its dictionaries are expanded
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"local_image_path": [f"{i:08d}.jpg" for i in range(1000)], "text_info": ["x"] * 1000}),
                   plain, use_dictionary=False, compression="zstd")
    monkeypatch.setattr(tables, "MAX_CSV_BYTES", 8192)
    with pytest.raises(DataError) as error:
        tables.read_input(plain)
    meta = pq.ParquetFile(plain).metadata
    pages = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    assert plain.stat().st_size < 8192 < pages
    assert str(error.value) == f"{plain}: its columns take {pages} bytes uncompressed, more than 8 KiB; split it into several files"

    repeated = tmp_path / "repeated.parquet"  # one long text on every row: small on disk and in its pages
    # (each row counted as its text's bytes and 8 more for its offset and index)
    pq.write_table(pa.table({"local_image_path": ["a.jpg"] * 1000, "text_info": ["spam " * 400] * 1000}), repeated)
    monkeypatch.setattr(tables, "MAX_CSV_BYTES", 1 << 20)
    with pytest.raises(DataError) as error:
        tables.read_input(repeated)
    assert 1000 * (5 + 8) + 1000 * (2000 + 8) == 2021 * 1000
    assert str(error.value) == (f"{repeated}: its columns take 2021 kB decoded, "
                                f"more than 1 MiB; split it into several files")

    not_parquet = tmp_path / "rows.pq"
    not_parquet.write_text("local_image_path,text_info\na.jpg,x\n")
    with pytest.raises(DataError) as error:
        tables.read_input(not_parquet)
    assert str(error.value).startswith(f"{not_parquet}: not a Parquet file pyarrow can read (")
    assert "\n" not in str(error.value)


def test_chunks_of_another_predict_are_refused_in_one_line(exportable_run, demo_data, tmp_path):
    given = _repeated_test_csv(demo_data, tmp_path / "new.csv", 1)
    out = tmp_path / "scored.csv"
    parts = parts_folder(out)
    parts.mkdir()
    expected = predict_parts.manifest(exportable_run, None, given, 32, chunk_rows=8, batch_size=None, base_dir=demo_data)
    (parts / MANIFEST).write_text(json.dumps({**expected, "input_sha1": "0" * 40}))
    # before torchrun starts: the launcher's own check (another input had the same name)
    result = CliRunner().invoke(predict_command, [str(exportable_run), str(given), "-o", str(out), "--base-dir",
                                                  str(demo_data), "--nproc", "2", "--chunk-rows", "8", "--quiet"])
    assert (result.exit_code, result.output) == (1, (
        f"{parts}: holds the chunks of another predict (input_sha1 was '{'0' * 40}', now '{expected['input_sha1']}'); "
        f"remove that folder to start over, or give -o another file\n"))

    # in the ranks: the model is checked too (another run's chunks, everything else the same)
    (parts / MANIFEST).write_text(json.dumps({**expected, "model_version": "sha256:0000000000000000"}))
    with pytest.raises(MmcoreError) as error:
        predict_in_ranks(exportable_run, given, out, chunk_rows=8, base_dir=demo_data, progress=False,
                         echo=lambda line: None)
    version = json.loads((parts / MANIFEST).read_text())["model_version"]
    assert str(error.value).startswith(f"{parts}: holds the chunks of another predict (model_version was {version!r}, "
                                       f"now 'sha256:")
    assert str(error.value).endswith("); remove that folder to start over, or give -o another file")
    assert not out.exists()


def test_each_rank_scores_on_its_local_gpu(monkeypatch, capsys):
    monkeypatch.setattr(predict_ranks, "_cuda_for", lambda source: True)
    assert rank_device("b", "cuda") == "cuda"  # not under torchrun: as given
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [rank_device("b", spec) for spec in ("auto", "cuda", "cuda:1", "cpu")] == ["cuda:1", "cuda:1", "cuda:1", "cpu"]
    assert capsys.readouterr().err == ""
    assert rank_device("b", "cuda:0") == "cuda:1"
    assert capsys.readouterr().err == ("warning: --device cuda:0 under torchrun: this process (LOCAL_RANK=1) uses cuda:1, "
                                       "the GPU of its local rank (use auto or cuda)\n")
    monkeypatch.setattr(predict_ranks, "_cuda_for", lambda source: False)
    assert rank_device("b", "auto") == "cpu"


def test_the_launcher_refuses_in_one_line_before_torchrun_starts(exportable_run, demo_data, tmp_path):
    no_text = _write_rows(tmp_path / "no_text.csv", [{"local_image_path": r["local_image_path"]}
                                                     for r in _rows(Path(demo_data) / "test.csv")])
    result = CliRunner().invoke(predict_command, [str(exportable_run), str(no_text), "-o", str(tmp_path / "out.csv"),
                                                  "--nproc", "2", "--quiet"])
    assert (result.exit_code, result.output) == (3, f"{no_text}: missing column 'text_info' (found: local_image_path)\n")
    assert not parts_folder(tmp_path / "out.csv").exists()

    result = CliRunner().invoke(predict_command, [str(exportable_run), str(no_text), "-o", str(tmp_path / "out.csv"),
                                                  "--nproc", "2", "--cache"])
    assert (result.exit_code, result.output) == (
        1, "--cache scores through one process's feature cache; leave it out with --nproc or torchrun\n")


def test_when_a_rank_fails_every_rank_stops(monkeypatch):
    from mmcore.errors import DataError

    monkeypatch.setattr(predict_ranks.dist, "rank", lambda: 1)
    monkeypatch.setattr(predict_ranks.dist, "all_gather_objects", lambda failed: [True, failed])
    with pytest.raises(predict_ranks.RankStopped) as error:  # this rank's step went well; rank 0's did not
        predict_ranks._agreed(lambda: "done")
    assert str(error.value) == "rank 1: stopped: rank 0 failed (its line says why)"

    def fails():
        raise DataError("x.csv: row 3: image not found: a.jpg")

    with pytest.raises(DataError) as error:  # a failed rank says its own line
        predict_ranks._agreed(fails)
    assert str(error.value) == "x.csv: row 3: image not found: a.jpg"
    monkeypatch.setattr(predict_ranks.dist, "all_gather_objects", lambda failed: [False, failed])
    assert predict_ranks._agreed(lambda: "done") == "done"


def test_one_job_per_output(exportable_run, demo_data, tmp_path):
    """A second predict on the same -o (say, after the launcher alone was killed and its ranks go on) is one line."""
    import socket

    from mmcore.store.locks import FileLock

    given = _repeated_test_csv(demo_data, tmp_path / "new.csv", 1)
    out = tmp_path / "scored.csv"
    held = FileLock(predict_parts.lock_file(out))
    held.acquire()
    try:
        busy = (f"{tmp_path / 'scored.csv.parts.lock'}: locked by pid {os.getpid()} on {socket.gethostname()}; "
                f"wait for it to end or stop it first")
        result = CliRunner().invoke(predict_command, [str(exportable_run), str(given), "-o", str(out), "--base-dir",
                                                      str(demo_data), "--nproc", "2", "--quiet"])
        assert (result.exit_code, result.output) == (4, busy + "\n")
        with pytest.raises(RunError) as error:  # the ranks take it too (torchrun started by hand)
            predict_in_ranks(exportable_run, given, out, base_dir=demo_data, progress=False, echo=lambda line: None)
        assert str(error.value) == busy
    finally:
        held.release()
    predict_in_ranks(exportable_run, given, out, base_dir=demo_data, progress=False, echo=lambda line: None)
    assert len(_rows(out)) == 32 and not predict_parts.lock_file(out).exists()


def test_a_bundle_scores_by_chunks_as_predict_does(exported_bundle, demo_data, tmp_path):
    """The chunked path with a bundle (onnxruntime): predict's own CSV, to the last digit (chunks of a multiple of the batch)."""
    given = _repeated_test_csv(demo_data, tmp_path / "new.csv", 1)
    plain, chunked = tmp_path / "plain.csv", tmp_path / "chunked.csv"
    predict_csv(exported_bundle, given, plain, base_dir=demo_data, device="cpu", progress=False, echo=lambda line: None)
    lines = []
    summary = predict_in_ranks(exported_bundle, given, chunked, chunk_rows=16, base_dir=demo_data, device="cpu",
                               progress=False, echo=lines.append)
    assert _rows(chunked) == _rows(plain)
    assert (summary.rows, summary.scored) == (32, 32)
    assert lines[0].startswith(f"scored 32 of 32 rows of {given} on cpu in 2 chunks of 16 rows (2 scored now): ")
