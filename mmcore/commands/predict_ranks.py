"""``mmcore predict SOURCE INPUT -o OUT --nproc N``: one input scored by several processes, GPUs or
machines, resumable by chunk after a kill.

torchrun starts the processes: ``--nproc N`` launches ``torchrun --standalone --nproc_per_node=N``
on this machine; several machines run torchrun themselves with its own rendezvous flags
(docs/distributed.md). The input's rows are cut into chunks of ``chunk_rows``; the chunks not
scored yet are dealt round robin to the ranks, and each rank scores its chunks through the one
scoring path (:func:`~mmcore.scoring.rows.score_rows` over the scorer
:func:`~mmcore.scoring.scorers.open_scorer` gives, on its local rank's device) and writes each
finished chunk atomically into ``OUT.parts/`` (:mod:`mmcore.commands.predict_parts`). Rank 0
then joins the chunks in input order, applies the run's decision, writes ``OUT`` (CSV or Parquet,
:mod:`mmcore.scoring.tables`) and removes ``OUT.parts/``.

Killed, the same command resumes: the finished chunks are kept and not scored again.
``OUT.parts/predict.json`` says what they are the scores of (the model's version, the input's sha1,
the options that change a score); a folder left by another predict is refused in one line, never
mixed in. A chunk has the same rows whatever the number of processes and a batch never spans two
chunks, so N processes give the scores of one, in the input's order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mmcore import dist
from mmcore.bounded import FileRules, read_regular_file
from mmcore.commands.predict import PredictSummary, check_output_file
from mmcore.commands.predict_parts import (
    MANIFEST,
    ChunkPlan,
    check_manifest,
    finished_chunks,
    manifest,
    only_job,
    parts_folder,
    read_chunks,
    write_chunk,
)
from mmcore.devices import cuda_index, parse_device
from mmcore.errors import MmcoreError, RunError
from mmcore.export.bundle import is_bundle
from mmcore.io import check_output_path, write_json
from mmcore.progress import progress_bar
from mmcore.scoring.rows import collect, score_rows
from mmcore.scoring.tables import input_rules, read_input, write_scored_table

#: rows per chunk: what a kill can cost, and one file per chunk in OUT.parts/
DEFAULT_CHUNK_ROWS = 4096
#: the launcher's summary file (rank 0 writes it): how ``--nproc`` hands :class:`PredictSummary` back
SUMMARY_ENV = "MMCORE_PREDICT_SUMMARY"
_SUMMARY_FILE = FileRules("file", "a predict summary", 1 << 16, "it is not one mmcore wrote")


class RankStopped(MmcoreError):
    """This rank stopped because another rank failed (whose line says why)."""


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
    with only_job(output):
        pass
    data = _source_recipe_data(source, echo=echo)
    _, split = read_input(input_table, base_dir, **input_rules(data))
    expected = manifest(source, None, input_table, len(split), chunk_rows=chunk_rows, batch_size=batch_size,
                         base_dir=base_dir)
    check_manifest(parts_folder(output), expected, skip=("model_version",))


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
        data = json.loads(read_regular_file(summary_path, _SUMMARY_FILE, error=RunError))
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
        job.enter_context(only_job(output))
        expected = manifest(source, scorer, input_table, len(split), chunk_rows=plan.chunk_rows,
                             batch_size=batch_size, base_dir=base_dir)
        if not check_manifest(parts, expected):
            write_json(parts / MANIFEST, expected)
        return finished_chunks(parts, plan)

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
                write_chunk(parts, index, scored.positions + span.start, scored.logits, scored.bad)
                bar.update(len(span))
        finally:
            bar.close()
        return len(mine)

    scored_here = _agreed(score_mine)
    scored_chunks = sum(dist.all_gather_objects(scored_here))

    def join_and_write():
        if not main:
            return None
        positions, logits, bad = read_chunks(parts, plan)
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


