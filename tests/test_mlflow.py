"""MLflow as a logger: a run read back with MlflowClient from a local store, its export and its resume in the
same MLflow run, a dead tracking server, a missing package."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

STORE_ENV = {"MLFLOW_ALLOW_FILE_STORE": "true"}  # MLflow 3 reads a folder store only when asked to
QUIET = {"progress": False, "echo": lambda line: None}


def _write_recipe(path, demo_data, **tables):
    import tomli_w
    from tiny import tiny_recipe_data

    from mmcore.recipe import deep_merge

    base = {"experiment": "mlf", "text": {"name": "none"}, "train": {"modality": "vision_only"},
            "logging": {"tensorboard": False}}  # vision only: fake_cnn exports
    path.write_text(tomli_w.dumps(tiny_recipe_data(demo_data, **deep_merge(base, tables))), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, demo_data):
    """One finished 2-epoch run that logged to a local MLflow store: (run directory, store folder)."""
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("mlflow")
    store = tmp / "mlruns"
    recipe = _write_recipe(tmp / "mlflow.toml", demo_data, train={"epochs": 2},
                           logging={"mlflow": {"tracking_uri": str(store), "experiment": "mmcore-tests"}})
    return run_training(load_recipe(recipe), recipe_path=recipe, out=tmp / "run", **QUIET), store


@pytest.fixture
def client(mlflow_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    for name, value in STORE_ENV.items():
        monkeypatch.setenv(name, value)
    return MlflowClient(tracking_uri=mlflow_run[1].as_uri())


def _run_id(run_dir):
    return json.loads((Path(run_dir) / "mlflow.json").read_text())["run_id"]


def test_the_run_is_read_back_with_mlflowclient(mlflow_run, client, tmp_path):
    import mmcore
    from mmcore.engine.mlflow_logger import recipe_params
    from mmcore.rundir import RunDir

    run_dir, store = mlflow_run
    assert json.loads((run_dir / "mlflow.json").read_text())["tracking_uri"] == store.as_uri()  # a path, resolved
    run = client.get_run(_run_id(run_dir))
    assert run.info.status == "FINISHED" and run.info.run_name == "mlf/run"
    assert client.get_experiment(run.info.experiment_id).name == "mmcore-tests"
    tags = run.data.tags
    assert (tags["mmcore.version"], tags["mmcore.run_dir"], tags["mmcore.experiment"]) == (
        mmcore.__version__, str(run_dir.resolve()), "mlf")

    params = run.data.params  # the resolved recipe, every key, TOML's spelling
    assert params == recipe_params(RunDir(run_dir).recipe_data())[0]
    assert (params["train.learning_rate"], params["train.epochs"], params["vision.name"], params["vision.params.width"]) == (
        "0.003", "2", "fake_cnn", "8")
    assert (params["train.freeze_backbone"], params["data.image_formats"]) == ("true", '["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"]')
    assert params["logging.mlflow.experiment"] == "mmcore-tests"

    results = json.loads((run_dir / "results.json").read_text())
    history = client.get_metric_history(run.info.run_id, "val/auroc")  # one point per epoch, on the global step
    assert [(m.step, m.value) for m in history] == [(4, results["history"][0]["val_auroc"]), (8, results["history"][1]["val_auroc"])]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 9))
    metrics, test = run.data.metrics, results["test"]
    assert metrics["test.at_threshold.auroc"] == test["at_threshold"]["auroc"]
    assert (metrics["test.intervals.auroc.low"], metrics["test.intervals.auroc.high"]) == tuple(test["intervals"]["auroc"])
    assert metrics["test.intervals.f1.low"] == test["intervals"]["f1"][0]
    assert metrics["decision.threshold"] == results["decision"]["threshold"] and metrics["selected_epoch"] == results["selected_epoch"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "report.html", "report_files", "roc.png", "training_curves.png", "recipe.toml",
            "test_predictions.json", "test_report.md"} <= artifacts
    thumbnails = {a.path for a in client.list_artifacts(run.info.run_id, "report_files")}
    assert thumbnails == {f"report_files/{p.name}" for p in (run_dir / "report_files").iterdir()}
    logged = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))
    assert Path(logged).read_bytes() == (run_dir / "results.json").read_bytes()


def test_export_adds_the_bundle_to_the_same_mlflow_run(mlflow_run, client, tmp_path):
    from mmcore.commands.export import export_run

    run_dir, store = mlflow_run
    said = []
    export_run(run_dir, tmp_path / "bundle", progress=False, echo=said.append)
    run_id = _run_id(run_dir)
    assert said[-1] == f"logged the bundle to MLflow run {run_id} ({store.as_uri()}) under bundle/"
    bundle = {a.path for a in client.list_artifacts(run_id, "bundle")}
    assert "bundle/manifest.json" in bundle and bundle == {f"bundle/{p.name}" for p in (tmp_path / "bundle").iterdir()}
    (experiment,) = client.search_experiments(filter_string="name = 'mmcore-tests'")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]


def test_an_export_of_a_run_without_an_mlflow_run_logs_nothing(tmp_path, capsys):
    from mmcore.engine.mlflow_logger import log_bundle_to_mlflow

    said = []
    log_bundle_to_mlflow(tmp_path, tmp_path, said.append)
    assert said == [] and capsys.readouterr().err == "" and list(tmp_path.iterdir()) == []


def test_resume_continues_the_same_mlflow_run(mlflow_run, client):
    """A run stopped after its last checkpoint (its MLflow run ended KILLED at exit) is resumed into that run."""
    from mmcore.commands.run import resume_training

    run_dir, _ = mlflow_run
    run_id = _run_id(run_dir)
    client.set_terminated(run_id, "KILLED")
    (run_dir / "status.json").write_text('{"state": "interrupted"}')
    resume_training(run_dir, **QUIET)
    assert _run_id(run_dir) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    (experiment,) = client.search_experiments(filter_string="name = 'mmcore-tests'")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]  # no second run
    results = json.loads((run_dir / "results.json").read_text())
    finals = client.get_metric_history(run_id, "test.at_threshold.auroc")  # logged by each process that finished
    assert len(finals) == 2 and finals[-1].value == results["test"]["at_threshold"]["auroc"]


def test_a_run_that_never_closes_its_mlflow_run_ends_it_killed(tmp_path, monkeypatch):
    """What a crash or Ctrl-C leaves: the exit hook ends the run KILLED (not RUNNING for ever); reopening it
    (``--resume``) marks it running again, under the same id, without logging its params twice."""
    from mlflow.tracking import MlflowClient

    from mmcore.engine.mlflow_logger import MlflowLogger
    from mmcore.recipe.schema import MlflowConfig

    config = MlflowConfig(tracking_uri=f"file:{tmp_path / 'store'}")
    first = MlflowLogger.start(config, tmp_path, {"seed": 1}, experiment="x")
    first._end_unfinished()
    for name, value in STORE_ENV.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=(tmp_path / "store").as_uri())
    assert client.get_run(first.run_id).info.status == "KILLED"
    again = MlflowLogger.start(config, tmp_path, {"seed": 2}, experiment="x")
    assert again.run_id == first.run_id and client.get_run(first.run_id).info.status == "RUNNING"
    assert client.get_run(first.run_id).data.params == {"seed": "1"}
    again.close()
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_an_unreachable_tracking_server_is_one_warning_and_the_run_completes(tmp_path, demo_data, monkeypatch, capsys):
    """Port 9 refuses connections: the first call fails within the bounds mmcore sets (MLflow's own defaults
    retry for minutes), says so once, and nothing later tries again."""
    from mmcore.commands.run import run_training
    from mmcore.engine import mlflow_logger
    from mmcore.recipe import load_recipe
    from mmcore.rundir import RunDir

    for name in mlflow_logger.HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    tried = []
    call = mlflow_logger.MlflowLogger._call

    def timed(self, doing, action):
        started = time.perf_counter()
        try:
            return call(self, doing, action)
        finally:
            tried.append((doing, time.perf_counter() - started))

    monkeypatch.setattr(mlflow_logger.MlflowLogger, "_call", timed)
    recipe = _write_recipe(tmp_path / "dead.toml", demo_data, logging={"mlflow": {"tracking_uri": "http://127.0.0.1:9"}})
    capsys.readouterr()
    run_dir = run_training(load_recipe(recipe), recipe_path=recipe, out=tmp_path / "run", **QUIET)

    assert capsys.readouterr().err == ("warning: MLflow (http://127.0.0.1:9): creating the run failed (Connection refused); "
                                       "mmcore goes on without logging to MLflow\n")
    assert RunDir(run_dir).status()["state"] == "completed" and (run_dir / "results.json").is_file()
    assert not (run_dir / "mlflow.json").exists()
    assert sum(seconds for _, seconds in tried) < 30
    assert [doing for doing, seconds in tried if seconds > 0.5] == ["creating the run"]


def test_a_missing_mlflow_is_one_line_naming_the_extra_before_any_data(tmp_path, demo_data):
    code = "import sys; sys.modules['mlflow'] = None; from mmcore.cli import main; main()"
    recipe = _write_recipe(tmp_path / "r.toml", demo_data, logging={"mlflow": {"tracking_uri": "file:./mlruns"}})
    result = subprocess.run([sys.executable, "-c", code, "run", str(recipe), "--out", str(tmp_path / "run"),
                             "--set", f"data.base_dir='{tmp_path / 'no-data'}'"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("logging.mlflow needs the mlflow-skinny package, which is not installed: "
                                     "pip install 'mmcore[mlflow]' (or bash scripts/install.sh)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]  # no run directory, no store


# --- the pieces --------------------------------------------------------------------------------------------------


def test_a_local_store_is_resolved_once_other_uris_are_kept_and_no_password_is_shown(tmp_path, monkeypatch):
    from mmcore.engine.mlflow_logger import resolve_tracking_uri, shown_uri

    monkeypatch.chdir(tmp_path)
    expected = (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("file:./mlruns") == resolve_tracking_uri("mlruns") == expected
    assert resolve_tracking_uri(expected) == expected and resolve_tracking_uri(str(tmp_path / "mlruns")) == expected
    for uri in ("http://mlflow.internal:5000", "https://x/y", "sqlite:///mlflow.db", "databricks"):
        assert resolve_tracking_uri(uri) == uri
    assert shown_uri("https://me:s3cret@mlflow.internal/x") == "https://me:***@mlflow.internal/x"
    assert shown_uri("http://127.0.0.1:9") == "http://127.0.0.1:9" and shown_uri(expected) == expected


def test_a_failed_request_is_said_in_a_few_words():
    from mlflow.exceptions import MlflowException

    from mmcore.engine.mlflow_logger import failure_reason

    prefix = "API request to http://h:5000/api/2.0/mlflow/runs/create failed with exception HTTPConnectionPool(host='h', port=5000): "
    timeout = prefix + ("Max retries exceeded with url: /x (Caused by ConnectTimeoutError(<HTTPConnection object at 0x7f>, "
                        "'Connection to h timed out. (connect timeout=10)'))")
    unknown = prefix + ("Max retries exceeded (Caused by NameResolutionError(\"<HTTPConnection object at 0x7f>: Failed to resolve "
                        "'h' ([Errno -2] Name or service not known)\"))")
    assert failure_reason(MlflowException(timeout)) == "Connection to h timed out. (connect timeout=10)"
    assert failure_reason(MlflowException(unknown)) == "Name or service not known"
    assert failure_reason(MlflowException("API request to endpoint /x failed with error code 403 != 200. Response body: 'no'")) == (
        "API request to endpoint /x failed with error code 403 != 200. Response body: 'no'")
    assert failure_reason(OSError(28, "No space left on device")) == "No space left on device"


def test_recipe_params_keep_mlflows_limits():
    from mmcore.engine.mlflow_logger import MAX_PARAM_VALUE_LENGTH, recipe_params

    long_key = "k" * 251
    params, skipped = recipe_params({"a": {"b": 1.5, "c": None, "on": False, "xs": [1, 2]}, "d": "x" * 7000,
                                     long_key: 1, "e": {"bad,name": 2}})
    assert params == {"a.b": "1.5", "a.c": "None", "a.on": "false", "a.xs": "[1, 2]",
                      "d": "x" * (MAX_PARAM_VALUE_LENGTH - 3) + "..."}
    assert skipped == [long_key, "e.bad,name"]


def test_a_damaged_mlflow_record_is_one_line(tmp_path, capsys):
    """Read by RunDir as data: refused in one line; a run that finds it logs nothing to MLflow (no second run)."""
    from mmcore.engine.mlflow_logger import MlflowLogger
    from mmcore.errors import RunError
    from mmcore.recipe.schema import MlflowConfig
    from mmcore.rundir import RunDir

    run_dir = RunDir(tmp_path)
    assert run_dir.mlflow_run() is None
    run_dir.write_mlflow_run("file:///x", "0123abcd")
    assert run_dir.mlflow_run() == {"tracking_uri": "file:///x", "run_id": "0123abcd"}
    for bad in ('{"tracking_uri": "file:///x", "run_id": "../../etc"}', "[]", "not json"):
        run_dir.mlflow_file.write_text(bad)
        with pytest.raises(RunError) as failure:
            run_dir.mlflow_run()
        assert str(failure.value) == f"{run_dir.mlflow_file}: not a record of an MLflow run (a tracking_uri and a run_id)"
    capsys.readouterr()
    logger = MlflowLogger.start(MlflowConfig(tracking_uri=str(tmp_path / "store")), tmp_path, {"seed": 1}, experiment="x")
    logger.add_scalar("val/auroc", 0.5, 1)
    logger.close()
    assert capsys.readouterr().err == (f"warning: {run_dir.mlflow_file}: not a record of an MLflow run (a tracking_uri and "
                                       f"a run_id); this run logs nothing to MLflow\n")
    assert not (tmp_path / "store").exists()
