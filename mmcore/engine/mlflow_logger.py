"""MLflow as a logger beside TensorBoard and W&B (``logging.mlflow``; ``pip install 'mmcore[mlflow]'``).

One MLflow run per run directory, recorded in its ``mlflow.json`` (:meth:`mmcore.rundir.RunDir.mlflow_run`):
``--resume`` continues that run and ``mmcore export`` adds the bundle to it. The run gets the flattened
recipe as params, every scalar TensorBoard gets (on the same global step), the final test metrics with
their bootstrap intervals, tags (mmcore's version, the run directory, the experiment) and, at the end,
the run directory's results, reports and plots as artifacts.

Logging never stops a run: MLflow reads its HTTP bounds from the environment on each request, so each
call here runs with a timeout and few retries (unless the user set their own), and the first failure
(an unreachable server, a refused write) is one warning line, after which this process logs nothing more
to MLflow. A relative local store (``file:./mlruns`` or a plain path) is resolved once, at the run's start,
so a resume or an export from another working directory finds the same store.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

from mmcore import __version__
from mmcore.errors import RunError
from mmcore.rundir import PREDICTIONS_FILE, RECIPE_FILE, REPORT_HTML, REPORT_MD, RESULTS_FILE, RunDir
from mmcore.store.root import short_error, warn

#: MLflow's own limits (``mlflow.utils.validation``): a key's length, a param value's, items per log_batch call
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
PARAMS_PER_CALL = 100
METRICS_PER_CALL = 1000
#: the characters MLflow accepts in a param or metric name
_VALID_NAME = re.compile(r"[/\w.\- :]+")
#: our bounds on each HTTP request unless the environment sets its own: a dead server costs one call of
#: at most about 3 x 10 s plus 2 s of backoff, then this process stops logging to it
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
#: the run directory's files logged as artifacts at the end (and its plots, ``*.png``, and ``report_files/``)
ARTIFACT_FILES = (RESULTS_FILE, REPORT_HTML, REPORT_MD, RECIPE_FILE, PREDICTIONS_FILE)
REPORT_FILES_DIR = "report_files"
#: ``test_predictions.json`` is left out above this size (one record per test row)
MAX_PREDICTIONS_BYTES = 100 << 20
#: where ``mmcore export`` puts the bundle among the run's artifacts
BUNDLE_ARTIFACT_PATH = "bundle"


def resolve_tracking_uri(uri):
    """A local store (``file:`` URI or a plain path) as an absolute ``file:`` URI; any other URI as given."""
    scheme = urlparse(uri).scheme
    if scheme not in ("", "file") or len(scheme) == 1 or uri == "databricks":  # a drive letter; MLflow's name
        return uri
    path = urlparse(uri).path if uri.startswith("file://") else uri.removeprefix("file:")
    return Path(path).expanduser().resolve().as_uri()


def shown_uri(uri):
    """``uri`` as printed: without a password (``https://user:***@host``)."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", uri)


@contextlib.contextmanager
def _bounded_environment(tracking_uri):
    """MLflow's HTTP bounds (and, for a local folder, its opt-in to the file store, which MLflow 3 otherwise
    refuses) set for one call and taken back after it; what the user set stays as it is."""
    wanted = dict(HTTP_BOUNDS)
    if tracking_uri.startswith("file:"):
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    added = [name for name in wanted if name not in os.environ]
    os.environ.update({name: wanted[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


#: the OS's reason or the timeout inside a failed request's message (MLflow wraps requests' errors in its own)
_CAUSE = re.compile(r"\[Errno -?\d+\] ([^'\")]+)|([\w .-]*timed out\. \([a-z]+ timeout=[\d.]+\))")
_MLFLOW_PREFIX = re.compile(r"^API request to \S+ failed with (timeout )?exception ")


def failure_reason(exc):
    """Why a tracking call failed, in a few words: ``Connection refused``, ``Connection to host timed out.
    (connect timeout=10)``, or the error's own message cut to 120 characters."""
    text = " ".join(str(exc).split())
    cause = _CAUSE.search(text)
    if cause:
        return (cause.group(1) or cause.group(2)).strip()
    return short_error(_MLFLOW_PREFIX.sub("", text) or type(exc).__name__)


def _tracking_errors():
    """What a tracking call raises when the store cannot take it: MLflow's errors, requests' and the OS's."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.exceptions.RequestException, OSError


def recipe_params(recipe_dict):
    """The recipe as MLflow params ``{dotted key: text}`` and the keys MLflow cannot take (too long, or
    characters it refuses); a value over MLflow's length limit is cut, ending in ``...``."""
    params, skipped = {}, []

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
                continue
            if len(name) > MAX_KEY_LENGTH or not _VALID_NAME.fullmatch(name):
                skipped.append(name)
                continue
            text = json.dumps(value) if isinstance(value, (bool, list)) else str(value)  # TOML's spelling
            if len(text) > MAX_PARAM_VALUE_LENGTH:
                text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
            params[name] = text

    walk(recipe_dict, "")
    return params, skipped


def result_metrics(results):
    """The final figures of ``results.json`` as metrics: every number under ``test`` (``test.at_threshold.auroc``;
    an interval as ``test.intervals.auroc.low`` and ``.high``), the decision's threshold and temperature,
    and the selected epoch."""
    metrics = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value):
                metrics[name + ".low"], metrics[name + ".high"] = float(value[0]), float(value[1])
            elif _is_number(value):
                metrics[name] = float(value)

    walk(results.get("test") or {}, "test.")
    decision = results.get("decision") or {}
    for key in ("threshold", "temperature"):
        if _is_number(decision.get(key)):
            metrics[f"decision.{key}"] = float(decision[key])
    if _is_number(results.get("selected_epoch")):
        metrics["selected_epoch"] = float(results["selected_epoch"])
    return metrics


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


class MlflowLogger:
    """The MLflow run of one run directory. After a failed call every method does nothing (one warning said
    why); :meth:`start` and :meth:`of_run` never raise for the tracking store's sake."""

    def __init__(self, tracking_uri, run_id=None, *, off=False):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = None
        self.off = off  # True once a call failed (or there is no run to log to): nothing more is sent
        self.pending = []  # metrics not yet sent (one log_batch call per METRICS_PER_CALL, or at flush)

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def start(cls, config, run_dir, recipe_dict, *, experiment):
        """The run directory's MLflow run: the one ``mlflow.json`` records (a resume: reopened, marked running),
        else a new one in ``config.experiment`` (default ``experiment``) with the recipe as params, recorded."""
        run_dir = RunDir(run_dir)
        try:
            record = run_dir.mlflow_run()
        except RunError as exc:
            warn(f"warning: {exc}; this run logs nothing to MLflow")
            return cls(config.tracking_uri, off=True)
        if record is not None:
            logger = cls._connect(record["tracking_uri"], record["run_id"])
            logger._call("reopening the run", lambda client: client.update_run(logger.run_id, status="RUNNING"))
        else:
            logger = cls._connect(resolve_tracking_uri(config.tracking_uri))
            name = config.run_name or f"{experiment}/{run_dir.path.name}"
            tags = {"mmcore.version": __version__, "mmcore.run_dir": str(run_dir.path.resolve()),
                    "mmcore.experiment": experiment}
            run = logger._call("creating the run",
                               lambda client: _create_run(client, config.experiment or experiment, name, tags))
            if run is None:
                return logger
            logger.run_id = run.info.run_id
            run_dir.write_mlflow_run(logger.tracking_uri, logger.run_id)
            logger._log_params(recipe_dict)
        if not logger.off:  # a run that stops before close() (a crash, Ctrl-C) is ended as KILLED, not left RUNNING
            atexit.register(logger._end_unfinished)
        return logger

    @classmethod
    def of_run(cls, run_dir):
        """The MLflow run a finished run directory records (for ``mmcore export``), or None when it has none."""
        from mmcore.kit.deps import MissingDependency, require_extra

        try:
            record = RunDir(run_dir).mlflow_run()
            if record is not None:
                require_extra("mlflow", f"logging the bundle to the MLflow run of {run_dir}")
        except (RunError, MissingDependency) as exc:
            warn(f"warning: {exc}; the bundle is not logged to MLflow")
            return None
        return None if record is None else cls._connect(record["tracking_uri"], record["run_id"])

    @classmethod
    def _connect(cls, tracking_uri, run_id=None):
        from mlflow.tracking import MlflowClient

        logger = cls(tracking_uri, run_id)
        logger.client = logger._call("opening the tracking store", lambda _: MlflowClient(tracking_uri=tracking_uri))
        return logger

    # -- logging --------------------------------------------------------------------------------

    def _call(self, doing, action):
        """``action(client)`` within the HTTP bounds; a failure is one warning and ends MLflow logging for this
        process (None is returned then, and at once on every later call)."""
        if self.off:
            return None
        with _bounded_environment(self.tracking_uri):
            try:
                return action(self.client)
            except _tracking_errors() as exc:
                self.off = True
                atexit.unregister(self._end_unfinished)
                warn(f"warning: MLflow ({shown_uri(self.tracking_uri)}): {doing} failed ({failure_reason(exc)}); "
                     f"mmcore goes on without logging to MLflow")
                return None

    def _log_params(self, recipe_dict):
        from mlflow.entities import Param

        params, skipped = recipe_params(recipe_dict)
        for chunk in _chunks([Param(key, value) for key, value in params.items()], PARAMS_PER_CALL):
            self._call("logging the recipe as params", lambda client: client.log_batch(self.run_id, params=chunk))
        if skipped:
            warn(f"warning: MLflow: {len(skipped)} recipe keys are not logged as params (longer than {MAX_KEY_LENGTH} "
                 f"characters or with characters MLflow refuses): {', '.join(skipped)[:500]}")

    def add_scalar(self, tag, value, step):
        """``tag`` = ``value`` at global step ``step`` (sent at :meth:`flush`, or when METRICS_PER_CALL wait)."""
        if self.off:
            return
        from mlflow.entities import Metric

        self.pending.append(Metric(tag, float(value), int(time.time() * 1000), int(step)))
        if len(self.pending) >= METRICS_PER_CALL:
            self.flush()

    def flush(self):
        """Send the pending metrics."""
        pending, self.pending = self.pending, []
        for chunk in _chunks(pending, METRICS_PER_CALL):
            self._call("logging metrics", lambda client: client.log_batch(self.run_id, metrics=chunk))

    def log_results(self, results, run_dir):
        """The final figures of ``results.json`` (see :func:`result_metrics`) and the run directory's results,
        reports and plots as artifacts."""
        for tag, value in result_metrics(results).items():
            self.add_scalar(tag, value, 0)
        self.flush()
        run_dir = Path(run_dir)
        files = [run_dir / name for name in ARTIFACT_FILES if (run_dir / name).is_file()]
        files = [path for path in files if path.name != PREDICTIONS_FILE or path.stat().st_size <= MAX_PREDICTIONS_BYTES]
        for path in [*files, *sorted(run_dir.glob("*.png"))]:
            self._call(f"logging {path.name}", lambda client: client.log_artifact(self.run_id, str(path)))
        if (run_dir / REPORT_FILES_DIR).is_dir():
            self._call(f"logging {REPORT_FILES_DIR}/", lambda client: client.log_artifacts(
                self.run_id, str(run_dir / REPORT_FILES_DIR), REPORT_FILES_DIR))

    def log_bundle(self, bundle_dir):
        """Every file of an exported bundle, under ``bundle/`` among the run's artifacts; whether it was logged."""
        self._call("logging the bundle", lambda client: client.log_artifacts(self.run_id, str(bundle_dir),
                                                                             BUNDLE_ARTIFACT_PATH))
        return not self.off

    def close(self, status="FINISHED"):
        """Send what is pending and end the run with ``status``."""
        self.flush()
        atexit.unregister(self._end_unfinished)
        self._call("ending the run", lambda client: client.set_terminated(self.run_id, status))

    def _end_unfinished(self):
        """At exit, a run that never reached :meth:`close` (a crash, Ctrl-C): KILLED; ``--resume`` reopens it."""
        self.close(status="KILLED")


def log_bundle_to_mlflow(run_dir, bundle_dir, echo):
    """``mmcore export``: the bundle into the MLflow run that ``run_dir`` records (nothing when it has none)."""
    logger = MlflowLogger.of_run(run_dir)
    if logger is not None and logger.log_bundle(bundle_dir):
        echo(f"logged the bundle to MLflow run {logger.run_id} ({shown_uri(logger.tracking_uri)}) under {BUNDLE_ARTIFACT_PATH}/")


def _create_run(client, experiment, run_name, tags):
    """A new run in the experiment named ``experiment``, created if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(experiment)
        except MlflowException:  # created meanwhile by another run: use it
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    return client.create_run(experiment_id, run_name=run_name, tags=tags)
