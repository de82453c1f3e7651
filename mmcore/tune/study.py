"""The Optuna study behind ``mmcore tune``: storage, samplers, pruners, the trial loop, the summary.

A study lives in one directory: ``tune.json`` (what it searches), ``study.db`` (Optuna's SQLite
storage unless ``--storage`` names another SQLAlchemy URL), one ordinary run directory per trial
(``trial-000/``, ...) and, at the end, ``comparison.md``/``.csv``, ``best.toml``, ``study.json``,
``history.png`` and ``importance.png``.

Every process that runs trials (``--jobs`` workers, other ``mmcore tune`` processes on the same
storage, other machines) runs the same loop: take the lock (on this machine), fail the trials
whose process stopped sending heartbeats (each such trial is queued again once, and resumes from
its ``last.ckpt`` when it has one), then ask Optuna for a trial while the budget of ``--trials``
logical trials is not spent. A retry is the same logical trial (same parameters, same directory).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import attrs

from mmcore.errors import RecipeError, RunError

#: seconds between a running trial's liveness records in the storage
HEARTBEAT = 10
#: a running trial whose heartbeat is older than this many intervals is taken as dead
GRACE = 5
#: how often a trial whose process died is queued again
MAX_KILLS = 1
CONFIG_FILE = "tune.json"
STUDY_FILE = "study.json"
LOCK_FILE = ".tune.lock"
DB_FILE = "study.db"
BEST_FILE = "best.toml"
ENV_CONFIG = "MMCORE_TUNE_CONFIG"
ENV_OVERRIDES = "MMCORE_TUNE_OVERRIDES"
# trial attributes
SURPLUS = "mmcore_surplus"  # asked by a process that lost the race for the last slot; never trained
KILLS = "mmcore_kills"  # system attr: how often this logical trial's process died under it
ROOT = "failed_trial"  # system attr (Optuna's own name): the first trial number of a retried trial


@attrs.frozen
class TuneConfig:
    """Everything a process needs to run trials of one study (handed to workers as JSON)."""

    recipe: str
    space: str
    study_dir: str
    study_name: str
    storage: str
    trials: int
    metric: str
    direction: str
    epochs: int
    overrides: tuple = ()
    sampler: str = "tpe"
    pruner: str = "median"
    nproc: int | None = None
    seed: int | None = None
    heartbeat: int = HEARTBEAT
    progress: bool = True

    def to_json(self):
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        data["overrides"] = tuple(data.get("overrides") or ())
        return cls(**data)

    def trial_dir(self, root):
        """The run directory of logical trial ``root``."""
        return Path(self.study_dir) / f"trial-{root:03d}"


# ---------------------------------------------------------------------------------- storage


def masked(url):
    """A storage URL fit to print and save (no password)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: say it as given, minus nothing secret
        return url.split("@")[-1] if "@" in url else url


def make_storage(url, heartbeat=None):
    """Optuna's RDB storage; with ``heartbeat``, dead trials are failed and queued again once."""
    import inspect

    import optuna

    kwargs = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # several processes share the file
        path = sqlite_file(url)
        if path is not None and os.path.isfile(path) and not os.access(path, os.W_OK):
            raise RunError(_read_only(path))
    if heartbeat:
        names = inspect.signature(optuna.storages.RDBStorage).parameters
        # optuna >= 4.9 renamed the callback
        callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in names else "failed_trial_callback"
        kwargs.update(heartbeat_interval=heartbeat, grace_period=GRACE * heartbeat, **{callback: retry_killed})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server
        raise RunError(f"--storage {masked(url)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def sqlite_file(url):
    """The file of a SQLite storage URL (``sqlite:///study.db``, ``sqlite:///file:PATH?mode=ro&uri=true``);
    None for another database or the in-memory one."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database or ""
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: RDBStorage says so
        return None
    path = database.removeprefix("file:").partition("?")[0]
    return path if path and path != ":memory:" else None


def _read_only(path):
    return f"{path}: the study's SQLite file is read-only; make it writable (chmod u+w {path}) or give --storage another file"


@contextlib.contextmanager
def storage_errors(url):
    """Optuna's storage failures (a read-only SQLite file, a database gone away) as one line naming it."""
    import optuna
    import sqlalchemy.exc

    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        path = sqlite_file(url)
        if path is not None and "readonly" in str(cause):
            raise RunError(_read_only(path)) from None
        raise RunError(f"--storage {masked(url)}: {_first(cause)}") from None


@contextlib.contextmanager
def study_lock(study_dir):
    """One process of this machine at a time asks for trials (and creates the study): the store's
    :func:`~mmcore.store.locks.file_lock` (``flock``, or an ``O_EXCL`` lock file where there is none)."""
    from mmcore.store.locks import file_lock

    with file_lock(Path(study_dir) / LOCK_FILE):
        yield


def root_number(trial):
    """The logical trial a (possibly retried) Optuna trial belongs to."""
    return trial.system_attrs.get(ROOT, trial.number)


def requeue(study, trial, *, kills=None):
    """Queue ``trial`` again: same parameters, same logical trial (so the same run directory)."""
    import optuna

    system = {**trial.system_attrs, ROOT: root_number(trial)}
    if kills is not None:
        system[KILLS] = kills
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=trial.user_attrs,
            system_attrs=system,
        )
    )


def retry_killed(study, trial):
    """Storage callback for a trial whose process died: queue it again, once."""
    kills = trial.system_attrs.get(KILLS, 0) + 1
    if kills <= MAX_KILLS:
        requeue(study, trial, kills=kills)


def logical_trials(trials):
    """``{root: [optuna trials, oldest first]}`` of the study's logical trials (surplus asks left out)."""
    groups = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.user_attrs.get(SURPLUS):
            continue
        groups.setdefault(root_number(trial), []).append(trial)
    return groups


def next_action(trials, budget):
    """``"run"`` (ask a trial), ``"wait"`` (others' trials still running) or ``"done"``."""
    from optuna.trial import TrialState

    if any(t.state == TrialState.WAITING for t in trials):
        return "run"
    if len(logical_trials(trials)) < budget:
        return "run"
    if any(t.state == TrialState.RUNNING for t in trials):
        return "wait"
    return "done"


def is_surplus(trials, trial, budget):
    """A new trial beyond the budget (another machine took the last slot at the same moment)."""
    if root_number(trial) != trial.number:
        return False
    return sum(1 for root in logical_trials(trials) if root < trial.number) >= budget


# ---------------------------------------------------------------------------------- samplers


def parse_spec(text, option):
    """``"median:n_startup_trials=1,n_warmup_steps=0"`` -> ("median", {...}); values are TOML."""
    from mmcore.recipe import parse_override
    from mmcore.recipe.load import split_values

    name, _, rest = text.partition(":")
    kwargs = {}
    for item in split_values(rest) if rest.strip() else []:
        key = item.partition("=")[0].strip()
        if "=" not in item or not key.isidentifier():
            raise RecipeError(f"{option} {text}: expected NAME or NAME:key=value,...")
        kwargs[key] = parse_override(item)[1]
    return name.strip().lower(), kwargs


def make_sampler(text, space, seed=None):
    """TPE (default), random or grid, with Optuna's own keyword arguments after ``:``."""
    import optuna

    name, kwargs = parse_spec(text, "--sampler")
    if seed is not None:
        kwargs.setdefault("seed", seed)
    makers = {
        "tpe": lambda: optuna.samplers.TPESampler(**kwargs),
        "random": lambda: optuna.samplers.RandomSampler(**kwargs),
        "grid": lambda: _grid_sampler()(space.grid(), **kwargs),
    }
    if name not in makers:
        raise RecipeError(f"--sampler {text}: unknown sampler {name!r} (one of {', '.join(makers)})")
    try:
        return makers[name]()
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"--sampler {text}: {exc}") from None


def _grid_sampler():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid without its ``study.stop()`` at the end (valid only inside ``Study.optimize``):
        the trial budget (the grid's size) ends the study."""

        def after_trial(self, study, trial, state, values):
            pass

    return GridSampler


def make_pruner(text, epochs):
    """Median (default), Hyperband (resource = epochs) or none, with Optuna's keyword arguments."""
    import optuna

    name, kwargs = parse_spec(text, "--pruner")
    makers = {
        "median": lambda: optuna.pruners.MedianPruner(**kwargs),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(**{"min_resource": 1, "max_resource": epochs, **kwargs}),
        "none": lambda: optuna.pruners.NopPruner(**kwargs),
    }
    if name not in makers:
        raise RecipeError(f"--pruner {text}: unknown pruner {name!r} (one of {', '.join(makers)})")
    try:
        return makers[name]()
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"--pruner {text}: {exc}") from None


def load_study(config, *, heartbeat=True, seed_offset=0):
    """The study with this process's sampler and pruner; returns (study, storage)."""
    import optuna

    from mmcore.tune.space import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(config.storage, config.heartbeat if heartbeat else None)
    seed = None if config.seed is None else config.seed + seed_offset
    study = optuna.load_study(
        study_name=config.study_name,
        storage=storage,
        sampler=make_sampler(config.sampler, load_space(config.space), seed),
        pruner=make_pruner(config.pruner, config.epochs),
    )
    return study, storage


# ---------------------------------------------------------------------------------- trials


@contextlib.contextmanager
def heartbeat(storage, trial_id, interval):
    """Record that this trial is alive every ``interval`` seconds until the block ends."""
    stop = threading.Event()

    def beat():
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # noqa: BLE001 - one missed beat is covered by the grace period
                pass

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def work(config, *, train_trial, index=0, registry=None, echo=print):
    """Run trials of the study until its budget is spent and no trial is left running; returns how many ran here.

    ``train_trial(config, trial, trial_dir, overrides, *, resume, registry, echo)`` trains one trial's
    run directory in this process (``mmcore tune`` passes :func:`mmcore.commands.tune.train_trial`:
    the study knows Optuna and the trial directories, not how a run trains).
    """
    from mmcore.tune.space import load_space

    study, storage = load_study(config, seed_offset=index)
    space = load_space(config.space)
    distributions = space.distributions()
    ran, waiting = 0, False
    import optuna

    while True:
        with study_lock(config.study_dir), warnings.catch_warnings():
            # heartbeats outside Study.optimize and fail_stale_trials are what Optuna calls experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            action = next_action(trials, config.trials)
            if action == "run":
                trial = study.ask(distributions)
                storage.record_heartbeat(trial._trial_id)  # alive from the first moment
        if action == "done":
            return ran
        if action == "wait":
            if not waiting:
                echo("waiting for trials still running elsewhere (a dead one is taken over after "
                     f"{GRACE * config.heartbeat} s without a heartbeat)")
                waiting = True
            time.sleep(config.heartbeat)
            continue
        waiting = False
        frozen = storage.get_trial(trial._trial_id)  # a live Trial does not show its system attrs
        if is_surplus(study.get_trials(deepcopy=False), frozen, config.trials):
            trial.set_user_attr(SURPLUS, True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        run_trial(config, study, storage, space, trial, frozen, train_trial=train_trial, registry=registry, echo=echo)
        ran += 1


def run_trial(config, study, storage, space, trial, frozen, *, train_trial, registry=None, echo=print):
    """Train one Optuna trial (``frozen``: its stored record) as a run directory and tell Optuna how it ended
    (``train_trial``: see :func:`work`)."""
    from optuna.trial import TrialState

    from mmcore.engine.runtime import release_memory
    from mmcore.engine.training import Interrupted
    from mmcore.rundir import RECIPE_FILE, failure_message, read_status, write_status
    from mmcore.tune.space import toml_value

    root = root_number(frozen)
    trial_dir = config.trial_dir(root)
    values = {p.key: p.value(frozen.params[p.key]) for p in space.params}
    label = ", ".join(f"{key}={toml_value(value)}" for key, value in values.items())
    again = f" (again, as Optuna trial {trial.number})" if root != trial.number else ""
    echo(f"== trial {root}{again}: {label} -> {trial_dir}")
    trial.set_user_attr("dir", trial_dir.name)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    overrides = space.overrides(frozen.params)
    with heartbeat(storage, trial._trial_id, config.heartbeat):
        try:
            action = _prepare_dir(trial_dir, echo)
            if action == "resume":
                echo(f"trial {root}: resuming from {trial_dir / 'last.ckpt'}")
            if action is not None:
                _train(config, trial, trial_dir, overrides, resume=action == "resume", train_trial=train_trial,
                       registry=registry, echo=echo)
            outcome = _outcome(config, trial_dir)
        except (Interrupted, KeyboardInterrupt):
            study.tell(trial, state=TrialState.FAIL)
            requeue(study, storage.get_trial(trial._trial_id))  # an interrupt is not a failure: continue it next time
            echo(f"trial {root} interrupted; run the same mmcore tune command again to continue it")
            raise
        except Exception as exc:  # noqa: BLE001 - one trial's failure must not end the study
            message = failure_message(exc, trial_dir)
            trial_dir.mkdir(parents=True, exist_ok=True)
            status = read_status(trial_dir)
            if status is None or status.get("state") != "failed":
                write_status(trial_dir, "failed", error=message, overrides=overrides)
            trial.set_user_attr("error", message)
            study.tell(trial, state=TrialState.FAIL)
            echo(f"trial {root} failed: {message}")
            return
        finally:
            release_memory()
    recipe_text = (trial_dir / RECIPE_FILE).read_text(encoding="utf-8")
    trial.set_user_attr("recipe", recipe_text)  # best.toml on any machine that shares the storage
    if outcome["state"] == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        echo(f"trial {root}: pruned after epoch {outcome['epoch']} ({config.metric} = {_fmt(outcome['value'])})")
    elif outcome["value"] is None or not math.isfinite(outcome["value"]):
        trial.set_user_attr("error", f"{config.metric} was not computed")
        study.tell(trial, state=TrialState.FAIL)
        echo(f"trial {root} failed: {config.metric} was not computed")
    else:
        study.tell(trial, outcome["value"])
        echo(f"trial {root}: {config.metric} = {_fmt(outcome['value'])}")


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"


def _prepare_dir(trial_dir, echo):
    """What to do with a trial's directory: "train" it, "resume" it, or None (already finished)."""
    from mmcore.rundir import RunDir

    if not trial_dir.exists():
        return "train"
    run = RunDir(trial_dir)
    state = (run.status() or {}).get("state")
    if state in ("completed", "pruned") and run.results_file.is_file():
        echo(f"{trial_dir.name}: already {state} (its process died before telling the study); not trained again")
        return None
    if state in ("running", "interrupted", "failed") and run.last.is_file() and run.recipe_file.is_file():
        return "resume"
    if state in ("running", "interrupted", "failed") or not any(trial_dir.iterdir()):
        shutil.rmtree(trial_dir)  # an unfinished trial without a checkpoint: nothing in it to keep
        return "train"
    raise RunError(f"{trial_dir}: exists and is not an unfinished trial of this study; move it away")


def _train(config, trial, trial_dir, overrides, *, resume, train_trial, registry, echo):
    """In this process, or as ``torchrun -m mmcore.tune trial ...`` with ``--nproc``."""
    if not config.nproc:
        return train_trial(config, trial, trial_dir, overrides, resume=resume, registry=registry, echo=echo)
    import subprocess

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.nproc}",
        "-m", "mmcore.tune", "trial", str(trial._trial_id), str(trial_dir), *(["--resume"] if resume else []),
    ]
    env = {**os.environ, ENV_CONFIG: config.to_json(), ENV_OVERRIDES: json.dumps(overrides)}
    process = subprocess.Popen(command, env=env, preexec_fn=die_with_parent)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()  # it got the same Ctrl-C and is writing last.ckpt
        raise
    if code in (130, 143):
        from mmcore.engine.training import Interrupted

        raise Interrupted(f"trial in {trial_dir} was interrupted")
    if code:
        from mmcore.rundir import read_status

        error = (read_status(trial_dir) or {}).get("error")
        raise RunError(f"torchrun exited with status {code}" + (f": {error}" if error else " (its output is above)"))


def _outcome(config, trial_dir):
    """How a trial's run ended, from its directory: state, objective value, epoch pruned at."""
    from mmcore.rundir import RunDir, read_status

    status = read_status(trial_dir) or {}
    results = RunDir(trial_dir).results()
    if results is None:
        raise RunError(f"{trial_dir}: results.json is missing or unreadable")
    value = (results.get("val") or {}).get(config.metric)
    if status.get("state") == "pruned":
        history = results.get("history") or []
        last = history[-1].get(config.metric) if history else value
        return {"state": "pruned", "value": last, "epoch": status.get("pruned_at_epoch")}
    return {"state": "complete", "value": value, "epoch": results.get("selected_epoch")}


def die_with_parent():
    """In a child process: get SIGTERM when the parent dies (so a killed ``mmcore tune`` leaves no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover - no libc by that name
            pass


def gpu_slots(jobs, nproc, visible):
    """``CUDA_VISIBLE_DEVICES`` for each of ``jobs`` workers (``nproc`` devices each, round robin); None below 2 GPUs."""
    if len(visible) < 2:
        return [None] * jobs
    per = max(1, nproc or 1)
    return [",".join(visible[(i * per + j) % len(visible)] for j in range(per)) for i in range(jobs)]


def visible_gpus():
    """The GPU ids this process may hand out."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no CUDA at all
        return []


# ---------------------------------------------------------------------------------- summary


def summarize(config, *, echo=print):
    """The comparison table, ``best.toml``, ``study.json`` and the plots; returns the study record."""
    from optuna.trial import TrialState

    from mmcore.evaluation.comparison import compare_runs, to_markdown, write_comparison
    from mmcore.io import write_json, write_text
    from mmcore.rundir import RECIPE_FILE, read_status, write_status
    from mmcore.tune.space import load_space

    study, _ = load_study(config, heartbeat=False)
    space = load_space(config.space)
    study_dir = Path(config.study_dir)
    trials = study.get_trials(deepcopy=False)
    finals = {root: group[-1] for root, group in sorted(logical_trials(trials).items())}
    dirs, elsewhere, entries = [], 0, []
    for root, trial in finals.items():
        trial_dir = config.trial_dir(root)
        status = read_status(trial_dir) if trial_dir.is_dir() else None
        if trial.state == TrialState.FAIL and status is not None and status.get("state") == "running":
            # its process died again after its one retry: the directory must not say it is still running
            write_status(trial_dir, "failed", error="its process died twice; not retried again")
        if trial_dir.is_dir():
            dirs.append(trial_dir)
        elif trial.state != TrialState.WAITING:
            elsewhere += 1
        entries.append({
            "trial": root,
            "dir": trial_dir.name,
            "state": trial.state.name.lower(),
            "value": trial.value,
            "params": {p.key: p.value(trial.params[p.key]) for p in space.params if p.key in trial.params},
            "host": trial.user_attrs.get("host"),
            "error": trial.user_attrs.get("error"),
        })
    if dirs:
        comparison = compare_runs(dirs, keys=space.keys)
        write_comparison(comparison, study_dir)
        echo("")
        echo(to_markdown(comparison).rstrip("\n"))
        echo("")
    if elsewhere:
        echo(f"{elsewhere} trials ran on other machines sharing the storage (their run directories are there)")
    counts = {state: sum(1 for e in entries if e["state"] == state) for state in ("complete", "pruned", "fail", "running", "waiting")}
    echo(f"tune: {len(entries)} of {config.trials} trials: {counts['complete']} completed, {counts['pruned']} pruned, "
         f"{counts['fail']} failed" + (f", {counts['running']} running" if counts["running"] else ""))
    for entry in entries:
        if entry["error"]:
            echo(f"  {entry['dir']}: {entry['error']}")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    record = {
        "study": config.study_name,
        "storage": masked(config.storage),
        "metric": config.metric,
        "direction": config.direction,
        "trials": entries,
        "best": None,
    }
    if complete:
        best = study.best_trial
        root = root_number(best)
        recipe_text = best.user_attrs.get("recipe")
        if recipe_text is None:
            recipe_text = (config.trial_dir(root) / RECIPE_FILE).read_text(encoding="utf-8")
        write_text(study_dir / BEST_FILE, recipe_text)
        record["best"] = {"trial": root, "dir": config.trial_dir(root).name, "value": best.value,
                          "params": next(e["params"] for e in entries if e["trial"] == root)}
        echo(f"best: {config.trial_dir(root).name} {config.metric} = {_fmt(best.value)} -> {study_dir / BEST_FILE}")
    write_json(study_dir / STUDY_FILE, record)
    for line in write_plots(study, study_dir):
        echo(line)
    if not complete:
        raise RunError(f"{study_dir}: no trial completed; nothing to choose from (see the lines above)")
    return record


def write_plots(study, out_dir):
    """``history.png`` and ``importance.png`` (Optuna's matplotlib plots); a note for each that cannot be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    notes = []
    varying = [name for name in {k for t in complete for k in t.params}
               if len({json.dumps(t.params.get(name), sort_keys=True) for t in complete}) > 1]
    plots = {"history.png": (vis.plot_optimization_history, "no completed trial yet")}
    if len(complete) < 2 or not varying:
        notes.append("importance.png not drawn: parameter importance needs at least 2 completed trials "
                     "whose parameters differ")
    else:
        plots["importance.png"] = (vis.plot_param_importances, "")
    for name, (plot, missing) in plots.items():
        if not complete:
            notes.append(f"{name} not drawn: {missing}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            _save_figure(figure, Path(out_dir) / name)
            plt.close(figure)
        except Exception as exc:  # noqa: BLE001 - a plot must not cost the study its summary
            notes.append(f"{name} not drawn: {_first(exc)}")
    return notes


def _first(exc):
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _save_figure(figure, path):
    from mmcore.io import atomic_open

    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
