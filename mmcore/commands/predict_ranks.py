"""``mmcore predict SOURCE INPUT -o OUT --nproc N``: one input scored by several processes, GPUs or
machines, resumable by chunk after a kill.

torchrun starts the processes: ``--nproc N`` launches ``torchrun --standalone --nproc_per_node=N``
on this machine; several machines run torchrun themselves with its own rendezvous flags
(docs/distributed.md). The input's rows are cut into chunks of ``chunk_rows``; the chunks not
scored yet are dealt round robin to the ranks, and each rank scores its chunks through the one
scoring path (:func:`~mmcore.scoring.rows.score_rows` over the scorer
:func:`~mmcore.scoring.scorers.open_scorer` gives, on its local rank's device) and writes each
finished chunk atomically into ``OUT.parts/``. Rank 0 then joins the chunks in input order, applies
the run's decision, writes ``OUT`` (CSV or Parquet, :mod:`mmcore.scoring.tables`) and removes
``OUT.parts/``.

Killed, the same command resumes: the finished chunks are kept and not scored again.
``OUT.parts/predict.json`` says what they are the scores of (the model's version, the input's sha1,
the options that change a score); a folder left by another predict is refused in one line, never
mixed in. A chunk has the same rows whatever the number of processes and a batch never spans two
chunks, so N processes give the scores of one, in the input's order.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import attrs
import numpy as np

from mmcore import dist
from mmcore.bounded import FileRules, read_regular_file
from mmcore.commands.predict import PredictSummary, check_output_file
from mmcore.devices import cuda_index, parse_device
from mmcore.errors import MmcoreError, RunError
from mmcore.export.bundle import is_bundle
from mmcore.io import atomic_open, check_output_path, file_sha1, write_json
from mmcore.progress import progress_bar
from mmcore.scoring.rows import collect, score_rows
from mmcore.scoring.tables import input_rules, read_input, write_scored_table

#: rows per chunk: what a kill can cost, and one file per chunk in OUT.parts/
DEFAULT_CHUNK_ROWS = 4096
#: what says which predict the chunks in OUT.parts/ belong to
MANIFEST = "predict.json"
MANIFEST_FORMAT = 1
_CHUNK = re.compile(r"^chunk-([0-9]{6,})\.npz$")
_MANIFEST_FILE = FileRules("file", "a predict.json", 1 << 16, "it is not one mmcore wrote")
#: the launcher's summary file (rank 0 writes it): how ``--nproc`` hands :class:`PredictSummary` back
SUMMARY_ENV = "MMCORE_PREDICT_SUMMARY"


class RankStopped(MmcoreError):
    """This rank stopped because another rank failed (whose line says why)."""


@attrs.frozen
class ChunkPlan:
    """An input's rows cut into chunks of ``chunk_rows`` (the last may be shorter)."""

    rows: int
    chunk_rows: int

    @property
    def count(self):
        return -(-self.rows // self.chunk_rows)

    def span(self, index):
        """``range`` of the positions chunk ``index`` holds."""
        return range(index * self.chunk_rows, min(self.rows, (index + 1) * self.chunk_rows))


def parts_folder(output):
    """Where the finished chunks of ``output`` are kept until it is written: ``OUT.parts/``."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


def lock_file(output):
    """The lock rank 0 holds while it works on ``output``: ``OUT.parts.lock`` (one job per output)."""
    parts = parts_folder(output)
    return parts.with_name(parts.name + ".lock")


def chunk_file(parts, index):
    return Path(parts) / f"chunk-{index:06d}.npz"


def launched_by_torchrun():
    """Whether this process is a rank torchrun started (then ``mmcore predict`` scores its part)."""
    return dist.torchrun_local_rank() is not None


def predict_in_ranks(source, input_table, output, *, nproc=None, chunk_rows=DEFAULT_CHUNK_ROWS, batch_size=None,
                     base_dir=None, device="auto", cache=False, verify=None, registry=None, progress=True, echo=print):
    """Score ``input_table`` (CSV or Parquet) with the run or bundle at ``source`` into ``output``, by chunks
    kept in ``OUT.parts/`` until the output is written -> :class:`~mmcore.commands.predict.PredictSummary`.

    Under torchrun: this rank's part (every rank returns the summary). Else with ``nproc``: checks the
    output, the input and ``OUT.parts/`` here, then launches ``torchrun --standalone
    --nproc_per_node=nproc -m mmcore predict ...`` and waits. Else: every chunk in this process.
    ``cache`` (the feature cache of one process) is refused.
    """
    if cache:
        raise MmcoreError("--cache scores through one process's feature cache; leave it out with --nproc or torchrun")
    device = parse_device(device)
    if nproc and not launched_by_torchrun():
        check_before_launch(source, input_table, output, chunk_rows=chunk_rows, batch_size=batch_size,
                            base_dir=base_dir, echo=echo)
        return launch(nproc, source, input_table, output, chunk_rows=chunk_rows, batch_size=batch_size,
                      base_dir=base_dir, device=device, verify=verify, progress=progress, echo=echo)
    return score_in_chunks(source, input_table, output, chunk_rows=chunk_rows, batch_size=batch_size, base_dir=base_dir,
                           device=device, verify=verify, registry=registry, progress=progress, echo=echo)


# -- the launcher ------------------------------------------------------------------------------


def check_before_launch(source, input_table, output, *, chunk_rows, batch_size, base_dir, echo=print):
    """What can be refused before torchrun starts, in one line each: ``-o``, the input's rows and a
    ``OUT.parts/`` left by a predict of another input or options (the model is checked by the ranks)."""
    _check_output(output, input_table)
    with _only_job(output):
        pass
    data = _source_recipe_data(source, echo=echo)
    _, split = read_input(input_table, base_dir, **input_rules(data))
    expected = _manifest(source, None, input_table, len(split), chunk_rows=chunk_rows, batch_size=batch_size,
                         base_dir=base_dir)
    _check_manifest(parts_folder(output), expected, skip=("model_version",))


def launch(nproc, source, input_table, output, *, chunk_rows, batch_size, base_dir, device, verify, progress, echo=print):
    """Run ``mmcore predict`` under ``torchrun --standalone --nproc_per_node=nproc`` and wait for it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mmcore", "predict", str(source), str(input_table), "-o", str(output),
               "--chunk-rows", str(chunk_rows), "--device", device]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    if base_dir:
        command += ["--base-dir", str(base_dir)]
    if verify:
        command.append("--verify")
    if not progress:
        command.append("--quiet")
    echo("launching: torchrun " + " ".join(command[3:]))
    handle, summary_path = tempfile.mkstemp(prefix="mmcore-predict-", suffix=".json")
    os.close(handle)
    try:
        sys.stdout.flush()
        process = subprocess.Popen(command, env={**os.environ, SUMMARY_ENV: summary_path})
        with _terminate_passed_on(process):
            try:
                code = process.wait()
            except KeyboardInterrupt:  # the ranks got the same Ctrl-C: let them stop, their chunks kept
                process.wait()
                raise
        if code != 0:
            kept = parts_folder(output)
            resume = f"; the chunks finished so far are kept in {kept}: the same command resumes" if kept.is_dir() else ""
            error = MmcoreError(f"predict --nproc {nproc}: torchrun exited {code}{resume}")
            error.exit_code = code if 0 < code < 256 else 1
            raise error
        data = json.loads(read_regular_file(summary_path, _MANIFEST_FILE, error=RunError))
        return PredictSummary(output=Path(output), **{key: data[key] for key in
                                                     ("rows", "scored", "positives", "threshold", "temperature")})
    finally:
        Path(summary_path).unlink(missing_ok=True)


@contextlib.contextmanager
def _terminate_passed_on(process):
    """A SIGTERM to this process (a scheduler stopping the job) goes to torchrun, which stops its ranks:
    they run in sessions of their own and would otherwise go on without it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _only_job(output):
    """Hold :func:`lock_file` for the block; another live job holding it is one line (:class:`~mmcore.store.locks.LockBusy`)."""
    from mmcore.store.locks import FileLock

    lock = FileLock(lock_file(output))
    try:
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(wait=False)
    except OSError as exc:
        raise RunError(f"{lock.path}: cannot take the lock ({exc.strerror or exc}); give -o a folder you can write") from None
    try:
        yield lock
    finally:
        lock.release()


def _source_recipe_data(source, *, echo=print):
    """The recipe (plain data) of the run or bundle at ``source``, read without building its model."""
    if is_bundle(source):
        from mmcore.export.bundle import RECIPE
        from mmcore.export.schema import read_recipe

        return read_recipe(Path(source) / RECIPE)[0]
    from mmcore.engine.restore import open_run

    return open_run(source, echo=echo).recipe_data()


def _check_output(output, input_table):
    check_output_path(output, "predictions table", option="-o")
    check_output_file(output, input_table)


# -- the ranks ---------------------------------------------------------------------------------


def score_in_chunks(source, input_table, output, *, chunk_rows=DEFAULT_CHUNK_ROWS, batch_size=None, base_dir=None,
                    device="auto", verify=None, registry=None, progress=True, echo=print):
    """This process's part of the job (all of it alone): see the module docstring."""
    joined = dist.init_distributed()
    try:
        with contextlib.ExitStack() as job:  # rank 0 holds the output's lock in it until the output is written
            return _score_in_chunks(source, Path(input_table), Path(output), chunk_rows=chunk_rows, batch_size=batch_size,
                                    base_dir=base_dir, device=device, verify=verify, registry=registry, progress=progress,
                                    echo=echo, job=job)
    finally:
        if joined:
            dist.shutdown_distributed()


def _score_in_chunks(source, input_table, output, *, chunk_rows, batch_size, base_dir, device, verify, registry,
                     progress, echo, job):
    main, rank, world = dist.is_main(), dist.rank(), dist.world_size()
    say = echo if main else _quiet
    parts = parts_folder(output)

    def open_everything():
        _check_output(output, input_table)
        from mmcore.scoring.scorers import open_scorer

        scorer = open_scorer(source, registry=registry, device=rank_device(source, device), verify=verify,
                             progress=progress and main)
        frame, split = read_input(input_table, base_dir, **{**input_rules(scorer.recipe_data),
                                                            "check_images": main and scorer.uses_vision})
        return scorer, frame, split

    scorer, frame, split = _agreed(open_everything)
    plan = ChunkPlan(len(split), int(chunk_rows))
    size = int(batch_size or scorer.batch_size)

    def prepare_parts():  # rank 0: refuse another predict's chunks, then say which are finished
        if not main:
            return None
        job.enter_context(_only_job(output))
        expected = _manifest(source, scorer, input_table, len(split), chunk_rows=plan.chunk_rows,
                             batch_size=batch_size, base_dir=base_dir)
        if not _check_manifest(parts, expected):
            write_json(parts / MANIFEST, expected)
        return _finished_chunks(parts, plan)

    finished = dist.broadcast_object(_agreed(prepare_parts))
    todo = [index for index in range(plan.count) if index not in finished]
    mine = todo[rank::world]
    if finished:
        say(f"resuming: {len(finished)} of {plan.count} chunks were scored before and are kept ({parts}); "
            f"{len(todo)} to score")

    def score_mine():
        bar = progress_bar(progress and main, total=sum(len(plan.span(i)) for i in mine), unit="row",
                           desc=f"predict {input_table.name}" + (f" (rank 0 of {world})" if world > 1 else ""))
        try:
            for index in mine:
                span = plan.span(index)
                scored = collect(score_rows(scorer, split.subset(span), batch_size=size, registry=registry))
                _write_chunk(parts, index, scored.positions + span.start, scored.logits, scored.bad)
                bar.update(len(span))
        finally:
            bar.close()
        return len(mine)

    scored_here = _agreed(score_mine)
    scored_chunks = sum(dist.all_gather_objects(scored_here))

    def join_and_write():
        if not main:
            return None
        positions, logits, bad = _read_chunks(parts, plan)
        raw, calibrated, predicted = scorer.decide(logits)
        write_scored_table(output, frame, [split.rows[int(i)] for i in positions], raw, calibrated, predicted)
        shutil.rmtree(parts, ignore_errors=True)
        return PredictSummary(output=output, rows=len(frame), scored=len(positions), positives=int(predicted.sum()),
                              threshold=float(scorer.decision["threshold"]),
                              temperature=float(scorer.decision["temperature"])), len(bad)

    summary, skipped = dist.broadcast_object(_agreed(join_and_write))
    where = scorer.device_name if world == 1 else f"{world} processes (rank 0 on {scorer.device_name})"
    say(f"scored {summary.scored} of {summary.rows} rows of {input_table} on {where} in {plan.count} chunks of "
        f"{plan.chunk_rows} rows ({scored_chunks} scored now): {summary.positives} predicted positive "
        f"(calibrated_score >= {summary.threshold:.4f})")
    if skipped:
        rows = "row" if skipped == 1 else "rows"
        say(f"{skipped} {rows} skipped (unreadable images; score left empty, data.on_bad_image = \"skip\")")
    say(f"wrote {output}")
    if main and os.environ.get(SUMMARY_ENV):
        write_json(os.environ[SUMMARY_ENV], {key: getattr(summary, key) for key in
                                              ("rows", "scored", "positives", "threshold", "temperature")})
    return summary


def _quiet(line):
    return None


def _agreed(step):
    """``step()`` on every rank; when it fails on any, every rank stops: a failed rank with its own
    line, the others saying which rank failed (so no rank waits for one that is gone)."""
    try:
        value, problem = step(), None
    except MmcoreError as exc:
        value, problem = None, exc
    failed = [r for r, bad in enumerate(dist.all_gather_objects(problem is not None)) if bad]
    if problem is not None:
        raise problem
    if failed:
        raise RankStopped(f"rank {dist.rank()}: stopped: rank {failed[0]} failed (its line says why)")
    return value


def rank_device(source, device):
    """``--device`` for this rank: under torchrun, ``auto`` and ``cuda`` mean the local rank's GPU
    (``auto``: when the scorer's runtime has CUDA, else the CPU), and a ``cuda:N`` that contradicts
    the local rank is said in one line and replaced (every rank would otherwise share GPU N)."""
    local = dist.torchrun_local_rank()
    if local is None or device == "cpu":
        return device
    if device == "auto":
        return f"cuda:{local}" if _cuda_for(source) else "cpu"
    if device != "cuda" and cuda_index(device) != local:
        print(f"warning: --device {device} under torchrun: this process (LOCAL_RANK={local}) uses cuda:{local}, "
              f"the GPU of its local rank (use auto or cuda)", file=sys.stderr, flush=True)
    return f"cuda:{local}"


def _cuda_for(source):
    """Whether the runtime that scores ``source`` has CUDA here: onnxruntime's providers for a bundle, torch for a run."""
    if is_bundle(source):
        from mmcore.kit.deps import require

        return "CUDAExecutionProvider" in require("onnxruntime", "scoring an ONNX bundle").get_available_providers()
    import torch

    return torch.cuda.is_available()


# -- OUT.parts/ ------------------------------------------------------------------------------------


def _manifest(source, scorer, input_table, rows, *, chunk_rows, batch_size, base_dir):
    """What the chunks are the scores of: the model, the input and the options that change a score."""
    digest = file_sha1(input_table)
    return {
        "format": MANIFEST_FORMAT,
        "source": str(Path(source).resolve()),
        "model_version": scorer.model_version if scorer is not None else None,
        "input": str(Path(input_table).resolve()),
        "input_sha1": digest.hex() if digest else None,
        "rows": rows,
        "chunk_rows": int(chunk_rows),
        "batch_size": int(batch_size) if batch_size else None,  # None: the model's own
        "base_dir": str(Path(base_dir).resolve()) if base_dir else None,
    }


def _check_manifest(parts, expected, *, skip=()):
    """True when ``parts`` holds chunks of the same predict as ``expected``; False when there is none.
    Another predict's folder is one line: which key differs, what to do."""
    path = Path(parts) / MANIFEST
    if not Path(parts).exists():
        return False
    if not path.is_file():
        raise MmcoreError(f"{parts}: a folder without {MANIFEST} is in the way of the chunks of -o; remove it, "
                          f"or give -o another file")
    try:
        found = json.loads(read_regular_file(path, _MANIFEST_FILE, error=RunError))
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise MmcoreError(f"{path}: not a {MANIFEST} mmcore wrote; remove {parts} to start over")
    for key, value in expected.items():
        if key not in skip and found.get(key) != value:
            raise MmcoreError(f"{parts}: holds the chunks of another predict ({key} was {found.get(key)!r}, now "
                              f"{value!r}); remove that folder to start over, or give -o another file")
    return True


def _finished_chunks(parts, plan):
    """The indices of the chunk files in ``parts`` (files of a killed writer, ``.*.tmp``, are not chunks)."""
    found = set()
    for path in Path(parts).iterdir():
        match = _CHUNK.match(path.name)
        if match and int(match[1]) < plan.count:
            found.add(int(match[1]))
    return found


def _write_chunk(parts, index, positions, logits, bad):
    buffer = io.BytesIO()
    np.savez(buffer, positions=np.asarray(positions, dtype=np.int64), logits=np.asarray(logits, dtype=np.float64),
             bad=np.asarray(list(bad), dtype=str))
    with atomic_open(chunk_file(parts, index), "wb") as handle:
        handle.write(buffer.getbuffer())


def _read_chunks(parts, plan):
    """Every chunk's positions, logits and unreadable rows' lines, in input order; each file checked."""
    positions, logits, bad = [], [], []
    for index in range(plan.count):
        chunk_positions, chunk_logits, chunk_bad = _read_chunk(chunk_file(parts, index), plan.span(index), parts)
        positions.append(chunk_positions)
        logits.append(chunk_logits)
        bad.extend(chunk_bad)
    return np.concatenate(positions), np.concatenate(logits), bad


def _read_chunk(path, span, parts):
    rules = FileRules("chunk", "a chunk file", len(span) * 4096 + (1 << 20), "it is not one mmcore wrote")
    try:
        with np.load(io.BytesIO(read_regular_file(path, rules, error=RunError)), allow_pickle=False) as data:
            positions, logits, bad = data["positions"], data["logits"], data["bad"]
    except (ValueError, KeyError, OSError) as exc:
        raise RunError(f"{path}: not a chunk mmcore wrote ({exc}); remove {parts} to start over") from None
    fits = (positions.dtype == np.int64 and logits.dtype == np.float64 and positions.ndim == logits.ndim == 1
            and len(positions) == len(logits) and bad.ndim == 1 and bad.dtype.kind == "U"
            and bool(np.all((positions >= span.start) & (positions < span.stop)))
            and bool(np.all(np.diff(positions) > 0)))
    if not fits:
        raise RunError(f"{path}: not the scores of rows {span.start + 1}-{span.stop} (its arrays do not match); "
                       f"remove {parts} to start over")
    return positions, logits, [str(line) for line in bad]
