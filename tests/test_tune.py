"""`mmcore tune`: Optuna studies of tiny runs, checked against the run directories and the storage."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import tomllib
from optuna.trial import TrialState

from mmcore.commands.tune import run_tune
from mmcore.errors import RecipeError, RunError
from mmcore.tune.space import load_space
from mmcore.tune.study import gpu_slots, is_surplus, logical_trials, next_action, write_plots

PNG = b"\x89PNG\r\n\x1a\n"
SPACE = """
"train.learning_rate" = { log_uniform = [1e-4, 1e-2] }
"fusion.params.dim" = { int = [8, 32], step = 8 }
"pooling.name" = { choice = ["mean", "attention"] }
"""


@pytest.fixture
def tune_recipe(tiny_recipe, tmp_path):
    """The tiny recipe, 2 epochs, its runs and feature cache inside tmp_path."""
    return tiny_recipe(
        experiment="tuned",
        output_dir=str(tmp_path / "runs"),
        cache={"dir": str(tmp_path / "cache")},
        train={"epochs": 2},
        logging={"tensorboard": False},
    )


def _space(tmp_path, text, name="space.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _storage_trials(study_dir, name):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}")
    return study.get_trials()


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _trial_dirs(study_dir):
    return sorted(p for p in study_dir.iterdir() if p.is_dir() and p.name.startswith("trial-"))


def _tune_cli(*args):
    return [sys.executable, "-m", "mmcore", "tune", *map(str, args)]


def _errors(result):
    """stderr without the warnings about installed plugins that fail to load (not this test's business)."""
    return [line for line in result.stderr.splitlines() if not line.startswith("warning: plugin ")]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_tune_runs_trials_writes_best_toml_table_plots_and_storage(tune_recipe, tmp_path, registry):
    """4 trials of 2 epochs: 4 run directories, best.toml = the best one's recipe, 4 valued trials in SQLite."""
    space = _space(tmp_path, SPACE)
    lines = []
    record = run_tune(tune_recipe, space, trials=4, registry=registry, progress=False, echo=lines.append)
    study_dir = tmp_path / "runs" / "tuned" / "tune-space"
    dirs = _trial_dirs(study_dir)
    assert [p.name for p in dirs] == ["trial-000", "trial-001", "trial-002", "trial-003"]

    trials = _storage_trials(study_dir, "space")
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    values = {}
    for trial, run_dir in zip(trials, dirs):
        results = _results(run_dir)
        # the value Optuna holds is the run's selected-epoch validation metric; the recipe has the sampled params
        assert trial.value == results["val"]["val_auroc"]
        recipe = tomllib.loads((run_dir / "recipe.toml").read_text())
        assert recipe["train"]["learning_rate"] == trial.params["train.learning_rate"]
        assert recipe["fusion"]["params"]["dim"] == trial.params["fusion.params.dim"]
        assert recipe["pooling"]["name"] == trial.params["pooling.name"]
        assert recipe["train"]["epochs"] == 2 and len(results["history"]) == 2
        assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
        values[run_dir] = trial.value

    best_value = max(values.values())  # val_auroc is maximized
    best_dir = study_dir / record["best"]["dir"]
    assert values[best_dir] == best_value == record["best"]["value"]
    assert (study_dir / "best.toml").read_text() == (best_dir / "recipe.toml").read_text()
    assert f"best: {best_dir.name} val_auroc = {best_value:.4f} -> {study_dir / 'best.toml'}" in lines
    table = (study_dir / "comparison.csv").read_text().splitlines()
    header = table[0].split(",")
    assert header[:2] == ["run", "status"] and {"train.learning_rate", "fusion.params.dim", "pooling.name"} <= set(header)
    assert [row.split(",")[0] for row in table[1:]] == [p.name for p in dirs]
    for name in ("history.png", "importance.png"):
        assert (study_dir / name).read_bytes()[:8] == PNG, name
    saved = json.loads((study_dir / "study.json").read_text())
    assert [t["state"] for t in saved["trials"]] == ["complete"] * 4


def test_a_bad_space_file_is_one_line_per_key_and_nothing_runs(tune_recipe, tmp_path):
    """Unknown path, bad range, wrong type, a component value the plugin refuses: one line each, exit 2."""
    space = _space(tmp_path, """
"train.learning_rate" = { log_uniform = [0.0, 1e-2] }
"train.lr" = { choice = [0.1, 0.2] }
"train.batch_size" = { uniform = [8.0, 32.0] }
"pooling.name" = { choice = ["mean", "nope"] }
"fusion.params.dim" = { int = [8, 30], step = 8 }
""", name="bad.toml")
    result = subprocess.run(_tune_cli(tune_recipe, "--space", space, "--trials", 2), capture_output=True, text=True,
                            env=_env(), timeout=600)
    assert result.returncode == 2, result.stderr
    assert _errors(result) == [
        f"{space}: train.learning_rate: log_uniform: low must be above 0 (got 0.0)",
        f"{space}: fusion.params.dim: int: high - low (22) is not a multiple of step (8)",
    ]
    assert not (tmp_path / "runs").exists()
    # the shape is right: now every key is checked against the recipe itself
    space.write_text(space.read_text().replace("[0.0, 1e-2]", "[1e-5, 1e-2]").replace("[8, 30]", "[8, 32]"))
    result = subprocess.run(_tune_cli(tune_recipe, "--space", space, "--trials", 2), capture_output=True, text=True,
                            env=_env(), timeout=600)
    assert result.returncode == 2, result.stderr
    lines = _errors(result)
    assert lines[0] == f"{space}: train.lr: unknown key (did you mean learning_rate?)"
    assert lines[1] == f"{space}: train.batch_size: must be an integer (got a number 8.0)"
    assert re.fullmatch(rf"{re.escape(str(space))}: pooling\.name: unknown pooling 'nope'.*\(at \"nope\"\)", lines[2])
    assert len(lines) == 3 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_space_shapes_and_grid_points(tmp_path):
    """Nested tables mean dotted keys; the grid needs finite keys; option typos are named."""
    space = load_space(_space(tmp_path, """
[train]
learning_rate = { log_uniform = [1e-4, 1e-2], points = 3 }
modality_dropout = { uniform = [0.0, 0.5], step = 0.25 }
[head.params]
hidden = { choice = [[8], [16, 8]] }
"""))
    assert space.keys == ["train.learning_rate", "train.modality_dropout", "head.params.hidden"]
    grid = space.grid()
    assert grid["train.learning_rate"] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert grid["train.modality_dropout"] == [0.0, 0.25, 0.5]
    assert space.grid_size() == 18
    # a table-valued choice travels through Optuna as JSON and comes back as the value
    assert space.overrides({"head.params.hidden": grid["head.params.hidden"][1]}) == ["head.params.hidden=[16, 8]"]
    bad = _space(tmp_path, '"train.learning_rate" = { uniform = [0.1, 0.2], stepp = 0.1 }\n', "typo.toml")
    with pytest.raises(RecipeError) as err:
        load_space(bad)
    assert str(err.value) == f"{bad}: train.learning_rate: uniform: unknown option stepp (allowed beside uniform: points, step)"
    continuous = load_space(_space(tmp_path, '"train.learning_rate" = { uniform = [0.1, 0.2] }\n', "c.toml"))
    with pytest.raises(RecipeError, match="the grid sampler needs a finite set: add points = N or use choice"):
        continuous.grid()


def test_grid_sampler_walks_the_whole_grid(tune_recipe, tmp_path, registry):
    """--sampler grid without --trials: one trial per grid point, each point once (what --sweep does)."""
    space = _space(tmp_path, '"head.params.hidden" = { choice = [[8], [16, 8]] }\n')
    record = run_tune(tune_recipe, space, sampler="grid", pruner="none", overrides=["train.epochs=1"],
                      registry=registry, progress=False, echo=lambda *a, **k: None)
    assert sorted(t["params"]["head.params.hidden"] for t in record["trials"]) == [[8], [16, 8]]
    study_dir = tmp_path / "runs" / "tuned" / "tune-space"
    assert len(_trial_dirs(study_dir)) == 2
    for run_dir in _trial_dirs(study_dir):
        recipe = tomllib.loads((run_dir / "recipe.toml").read_text())
        entry = next(t for t in record["trials"] if t["dir"] == run_dir.name)
        assert recipe["head"]["params"]["hidden"] == entry["params"]["head.params.hidden"]


def test_an_aggressive_pruner_prunes_the_bad_trials_after_one_epoch(tune_recipe, tmp_path, registry):
    """lr=50 wrecks val_loss at once: the median pruner (1 startup trial) stops those trials after epoch 1."""
    space = _space(tmp_path, '"train.learning_rate" = { choice = [0.003, 50.0] }\n', "bad_lr.toml")
    record = run_tune(tune_recipe, space, trials=4, sampler="random", seed=6, pruner="median:n_startup_trials=1",
                      overrides=['train.early_stopping.metric="val_loss"'], registry=registry, progress=False,
                      echo=lambda *a, **k: None)
    study_dir = tmp_path / "runs" / "tuned" / "tune-bad_lr"
    states = {t["dir"]: (t["state"], t["params"]["train.learning_rate"]) for t in record["trials"]}
    pruned = [d for d, (state, _) in states.items() if state == "pruned"]
    assert pruned, states
    for name, (state, lr) in states.items():
        run_dir = study_dir / name
        status = json.loads((run_dir / "status.json").read_text())
        history = _results(run_dir)["history"]
        if state == "pruned":
            # on_epoch_end stopped training: one epoch, not two, and the status says why
            assert lr == 50.0 and status["state"] == "pruned" and status["pruned_at_epoch"] == 1 and len(history) == 1
        else:
            assert state == "complete" and status["state"] == "completed" and len(history) == 2
    assert all(state == "complete" for state, lr in states.values() if lr == 0.003)  # a good trial is never pruned
    trials = {f"trial-{t.number:03d}": t.state for t in _storage_trials(study_dir, "bad_lr")}
    assert [n for n, s in trials.items() if s == TrialState.PRUNED] == pruned
    rows = {row.split(",")[0]: row.split(",")[1] for row in (study_dir / "comparison.csv").read_text().splitlines()[1:]}
    assert all(rows[name] == "pruned" for name in pruned)
    assert "best.toml" in os.listdir(study_dir) and record["direction"] == "minimize"


def _wait_for(predicate, process, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"mmcore tune exited {process.returncode} early:\n{process.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _state(run_dir):
    try:
        return json.loads((run_dir / "status.json").read_text()).get("state")
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_killed_study_resumes_without_redoing_finished_trials(tune_recipe, tmp_path):
    """SIGKILL mid-trial; the same command again keeps trial 0, resumes trial 1 from last.ckpt, runs trial 2."""
    space = _space(tmp_path, SPACE)
    study_dir = tmp_path / "study"
    command = _tune_cli(tune_recipe, "--space", space, "--trials", 3, "--out", study_dir, "--set", "train.epochs=4",
                        "--heartbeat", 1, "--pruner", "none", "--quiet")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    first, second = study_dir / "trial-000", study_dir / "trial-001"
    try:
        _wait_for(lambda: _state(first) == "completed" and (second / "last.ckpt").is_file() and _state(second) == "running",
                  process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    kept = (first / "results.json").stat().st_mtime_ns
    before = {t.number: t for t in _storage_trials(study_dir, "space")}
    assert before[0].state == TrialState.COMPLETE and before[1].state == TrialState.RUNNING

    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== trial 0:" not in result.stdout  # the finished trial is not run again
    assert "continuing the study: 1 trials already finished" in result.stdout
    assert f"trial 1: resuming from {second / 'last.ckpt'}" in result.stdout
    assert (first / "results.json").stat().st_mtime_ns == kept
    trials = _storage_trials(study_dir, "space")
    groups = logical_trials(trials)
    # three logical trials: 0, 1 (killed, then queued again as Optuna trial 2 or 3, depending on
    # whether its heartbeat had gone stale when the restart asked first) and a new one
    roots = sorted(groups)
    assert len(trials) == 4 and roots[:2] == [0, 1] and roots[2] in (2, 3) and groups[1][1].number in (2, 3)
    assert [p.name for p in _trial_dirs(study_dir)] == [f"trial-{root:03d}" for root in roots]
    assert all(_state(p) == "completed" for p in _trial_dirs(study_dir))
    assert [t.state for t in groups[0]] == [TrialState.COMPLETE]
    assert groups[0][0].datetime_complete == before[0].datetime_complete
    # the killed trial: failed for its silent heartbeat, then the same parameters again, completed
    assert [t.state for t in groups[1]] == [TrialState.FAIL, TrialState.COMPLETE]
    assert groups[1][1].params == before[1].params
    assert _results(second)["epochs_trained"] == 4
    assert groups[1][1].value == _results(second)["val"]["val_auroc"]


@pytest.mark.slow
def test_two_tune_processes_share_one_sqlite_study(tune_recipe, tmp_path):
    """`--jobs 2` and a second `mmcore tune` on the same study: 4 trials between them, none run twice."""
    space = _space(tmp_path, SPACE)
    study_dir = tmp_path / "shared"
    common = ["--space", space, "--trials", 4, "--out", study_dir, "--heartbeat", 2, "--pruner", "none", "--quiet"]
    processes = [
        subprocess.Popen(_tune_cli(tune_recipe, *common, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=_env())
        for extra in (["--jobs", 2], [])
    ]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)
    started = [m for out in outputs for m in re.findall(r"== trial (\d+)", out)]
    assert sorted(started) == ["0", "1", "2", "3"]  # each trial trained once, by one process
    trials = _storage_trials(study_dir, "space")
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) >= 2  # the work was shared
    for trial in trials:
        run_dir = study_dir / f"trial-{trial.number:03d}"
        assert trial.value == _results(run_dir)["val"]["val_auroc"]
    assert "job 0: started" in outputs[0] and "job 1: started" in outputs[0]


def _frozen(number, state, **system):
    trial = optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                                      system_attrs=system)
    trial.number = number
    return trial


def test_budget_counts_logical_trials_and_refuses_a_surplus_ask():
    """A retry is the same logical trial; a new ask beyond the budget is surplus; running ones are waited for."""
    done, retry = _frozen(0, TrialState.COMPLETE), _frozen(2, TrialState.WAITING, failed_trial=1)
    killed = _frozen(1, TrialState.FAIL)
    assert next_action([done, killed, retry], budget=2) == "run"  # the waiting retry first
    running = _frozen(2, TrialState.RUNNING, failed_trial=1)
    assert sorted(logical_trials([done, killed, running])) == [0, 1]
    assert next_action([done, killed, running], budget=2) == "wait"
    assert next_action([done, killed, _frozen(2, TrialState.COMPLETE, failed_trial=1)], budget=2) == "done"
    late = _frozen(3, TrialState.RUNNING)
    assert is_surplus([done, killed, running, late], late, budget=2)
    assert not is_surplus([done, killed, running, late], late, budget=3)
    assert not is_surplus([done, killed, running], running, budget=1)  # a retry is never surplus


def test_gpus_are_shared_out_per_job():
    assert gpu_slots(2, None, ["0"]) == [None, None]  # one GPU: nothing to choose
    assert gpu_slots(2, None, ["0", "1", "2", "3"]) == ["0", "1"]
    assert gpu_slots(2, 2, ["4", "5", "6", "7"]) == ["4,5", "6,7"]
    assert gpu_slots(3, None, ["0", "1"]) == ["0", "1", "0"]


def test_importance_needs_two_completed_trials(tmp_path):
    """One completed trial: history.png, and one line instead of importance.png."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5, params={"a": 0.1},
                                              distributions={"a": optuna.distributions.FloatDistribution(0, 1)}))
    notes = write_plots(study, tmp_path)
    assert notes == ["importance.png not drawn: parameter importance needs at least 2 completed trials whose parameters differ"]
    assert (tmp_path / "history.png").read_bytes()[:8] == PNG and not (tmp_path / "importance.png").exists()


# ---------------------------------------------------------------- every input bounded (issue 26)


@pytest.mark.parametrize(
    "text,expected",
    [
        ('"train.seed" = { int = [0, 1000000000] }',
         "the grid has 1000000001 points (train.seed (1000000001))"),
        ('"train.learning_rate" = { uniform = [0.0, 1.0], points = 1000000000 }',
         "the grid has 10^9 points (train.learning_rate (10^9))"),
        ('"train.learning_rate" = { uniform = [0.0, 1.0], step = 1e-12 }',
         "the grid has 1000000000001 points (train.learning_rate (1000000000001))"),
        ('"train.seed" = { int = [1, 1000000] }\n"train.epochs" = { int = [1, 1000000] }\n'
         '"pooling.name" = { choice = ["mean"] }',
         "the grid has 10^12 points (train.seed (10^6) x train.epochs (10^6))"),
    ],
    ids=["int_range", "points", "tiny_step", "two_keys"],
)
def test_a_grid_is_counted_before_it_is_built(tmp_path, text, expected):
    """Each of these built its whole grid in memory (until killed) before any check."""
    space = load_space(_space(tmp_path, text + "\n"))
    with pytest.raises(RecipeError) as err:
        space.grid_size()
    assert str(err.value) == (f"{space.path}: {expected}, more than 100000; give fewer points or a larger step, "
                              "or use --sampler tpe or random with --trials")
    with pytest.raises(RecipeError, match="more than 100000"):
        space.grid()


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "too_large", "deep"])
def test_the_space_file_is_read_as_a_recipe_is(tmp_path, kind):
    """`--space /dev/zero` read until killed, a FIFO hung, 100,000 brackets were a 2,990-line RecursionError."""
    from click.testing import CliRunner

    from mmcore.cli.main import cli

    path = tmp_path / "space.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = "/dev/zero"
    elif kind == "directory":
        path = tmp_path
    elif kind == "too_large":
        path.write_text("# padding\n" * 120_000)
    else:
        path.write_text('"train.x" = { choice = [' + "[" * 100_000 + "\n")
    expected = {
        "fifo": f"{path}: is not a regular file; name a TOML search space file",
        "device": "/dev/zero: is not a regular file; name a TOML search space file",
        "directory": f"{path}: is a directory; name a TOML search space file",
        "too_large": f"{path}: is larger than 1 MiB; a search space is a small TOML file",
        "deep": f"{path}: line 1: nested more than 32 levels deep (tables, arrays or dotted keys)",
    }[kind]
    with pytest.raises(RecipeError) as err:
        load_space(path)
    assert str(err.value) == expected
    result = CliRunner().invoke(cli, ["tune", str(tmp_path / "recipe.toml"), "--space", str(path), "--trials", "1"])
    if kind != "directory":  # (click refuses a directory itself)
        assert (result.exit_code, result.stderr.splitlines()) == (2, [expected])


def test_a_read_only_storage_and_an_output_under_a_file_are_one_line(tune_recipe, tmp_path, registry):
    """An existing read-only SQLite file was a 117-line Optuna traceback; --out under a file a FileExistsError."""
    space = _space(tmp_path, '"pooling.name" = { choice = ["mean", "attention"] }\n')
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    with pytest.raises(RunError) as err:
        run_tune(tune_recipe, space, trials=1, out=blocker / "study", registry=registry, progress=False, echo=print)
    assert str(err.value) == (f"{blocker / 'study'}: cannot write the study directory: {blocker} is a file, not a folder; "
                              "give --out a path whose parents are folders")
    db = tmp_path / "shared.db"
    optuna.create_study(study_name="space", storage=f"sqlite:///{db}")
    # read-only as SQLite sees it (a chmod does not stop root, who may run this)
    url = f"sqlite:///file:{db}?mode=ro&uri=true"
    with pytest.raises(RunError) as err:
        run_tune(tune_recipe, space, trials=1, storage=url, registry=registry, progress=False, echo=print)
    assert str(err.value) == (f"{db}: the study's SQLite file is read-only; make it writable (chmod u+w {db}) "
                              "or give --storage another file")
    assert not _trial_dirs(tmp_path / "runs" / "tuned" / "tune-space")
    if os.geteuid() != 0:  # the file's mode, checked before Optuna opens it
        os.chmod(db, 0o444)
        with pytest.raises(RunError, match=rf"^{re.escape(str(db))}: the study's SQLite file is read-only"):
            run_tune(tune_recipe, space, trials=1, storage=f"sqlite:///{db}", registry=registry, progress=False,
                     echo=print)
