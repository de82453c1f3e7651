"""`mmcore compare` and `mmcore run --sweep`: grids of tiny runs, tables checked against results.json."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import tomllib
from click.testing import CliRunner

from mmcore.cli.compare import compare_command
from mmcore.commands.sweep import parse_sweeps, run_sweep
from mmcore.errors import RecipeError
from mmcore.evaluation.comparison import FIXED_COLUMNS, METRIC_COLUMNS, compare_runs
from mmcore.recipe.load import split_values

GRID = ["pooling.name=mean,attention", "head.params.hidden=[8],[16, 8]"]
POINTS = [
    "1-pooling.name=mean,head.params.hidden=_8_",
    "2-pooling.name=mean,head.params.hidden=_16,_8_",
    "3-pooling.name=attention,head.params.hidden=_8_",
    "4-pooling.name=attention,head.params.hidden=_16,_8_",
]


@pytest.fixture
def sweep_recipe(tiny_recipe, tmp_path):
    return tiny_recipe(
        experiment="sweepy",
        seed=7,
        output_dir=str(tmp_path / "runs"),
        cache={"dir": str(tmp_path / "cache")},
        pooling={"name": "attention"},
        train={"batch_size": 32},
        logging={"tensorboard": False},
    )


def _csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _check_metrics(row, results):
    """Every metric cell (full precision in CSV) is the value in the run's results.json."""
    test = results["test"]
    expected = {
        "test_auroc": test["at_threshold"]["auroc"],
        "test_auprc": test["at_threshold"]["auprc"],
        "test_f1": test["at_threshold"]["f1"],
        "test_accuracy": test["at_threshold"]["accuracy"],
        "test_precision": test["at_threshold"]["precision"],
        "test_recall": test["at_threshold"]["recall"],
        "test_ece": test["ece_calibrated"],
        "threshold": results["decision"]["threshold"],
        "selected_epoch": results["selected_epoch"],
        "val_value": results["val"]["val_auroc"],
    }
    for column, value in expected.items():
        assert float(row[column]) == value, column
    assert row["val_metric"] == "val_auroc" and row["status"] == "completed"


def test_sweep_runs_the_grid_and_ends_with_the_comparison(sweep_recipe, registry):
    """A 2x2 sweep (pooling x head width) into the recipe's default place."""
    lines = []
    sweep_dir = run_sweep(sweep_recipe, [], GRID, registry=registry, progress=False, echo=lines.append)
    assert sweep_dir.parent == sweep_recipe.parent / "runs" / "sweepy"
    assert sweep_dir.name.startswith("sweep-")
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in runs] == POINTS
    for run_dir, (pooling, hidden) in zip(runs, [("mean", [8]), ("mean", [16, 8]), ("attention", [8]), ("attention", [16, 8])]):
        recipe = tomllib.loads((run_dir / "recipe.toml").read_text())
        assert recipe["pooling"]["name"] == pooling and recipe["head"]["params"]["hidden"] == hidden
        assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"

    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(p["dir"], p["state"]) for p in record["points"]] == [(name, "completed") for name in POINTS]
    assert record["points"][1]["overrides"] == ["pooling.name=mean", "head.params.hidden=[16, 8]"]

    # the table: swept keys first, then whatever else differs (attention pooling has params, mean none)
    table = _csv((sweep_dir / "comparison.csv").read_text())
    pooling_params = ["pooling.params.skip_cls_token", "pooling.params.heads", "pooling.params.dropout"]
    assert list(table[0]) == [*FIXED_COLUMNS, "pooling.name", "head.params.hidden", *pooling_params]
    assert [r["run"] for r in table] == POINTS
    assert [[r[c] for c in ("pooling.name", "head.params.hidden", *pooling_params)] for r in table] == [
        ["mean", "[8]", "false", "", ""],
        ["mean", "[16, 8]", "false", "", ""],
        ["attention", "[8]", "", "1", "0.0"],
        ["attention", "[16, 8]", "", "1", "0.0"],
    ]
    for row, run_dir in zip(table, runs):
        _check_metrics(row, _results(run_dir))
    markdown = (sweep_dir / "comparison.md").read_text()
    assert markdown.splitlines()[0] == "| " + " | ".join(table[0]) + " |"
    assert "\n".join(lines).count("== sweep ") == 4
    assert lines[-2:] == ["sweep: 4 of 4 runs completed", f"wrote {sweep_dir / 'comparison.md'} and {sweep_dir / 'comparison.csv'}"]
    assert markdown.strip() in "\n".join(lines)

    # `mmcore compare SWEEP_DIR` as a program: the same table, swept keys first
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-c", "from mmcore.cli.compare import compare_command; compare_command()", str(sweep_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (sweep_dir / "comparison.md").read_text()


def test_sweep_with_a_broken_point_fails_that_point_alone(sweep_recipe, registry, tmp_path):
    lines = []
    out = tmp_path / "broken-sweep"
    sweep_dir = run_sweep(
        sweep_recipe, ["head.params.hidden=[8]"], ["pooling.name=mean,nope,attention"], out=out,
        registry=registry, progress=False, echo=lines.append,
    )
    assert sweep_dir == out
    states = {p.name: json.loads((p / "status.json").read_text()) for p in out.iterdir() if p.is_dir()}
    assert sorted(states) == ["1-pooling.name=mean", "2-pooling.name=nope", "3-pooling.name=attention"]
    assert states["1-pooling.name=mean"]["state"] == states["3-pooling.name=attention"]["state"] == "completed"
    failed = states["2-pooling.name=nope"]
    error = f"{sweep_recipe} (--set pooling.name): pooling.name: unknown pooling 'nope'"
    assert failed["state"] == "failed" and failed["error"].startswith(error)
    assert failed["overrides"] == ["pooling.name=nope"]
    assert f"sweep point 2/3 (pooling.name=nope) failed: {failed['error']}" in lines
    assert "sweep: 2 of 3 runs completed, 1 failed:" in lines
    table = _csv((out / "comparison.csv").read_text())
    assert [(r["run"], r["status"], r["pooling.name"]) for r in table] == [
        ("1-pooling.name=mean", "completed", "mean"),
        ("2-pooling.name=nope", "failed", "nope"),
        ("3-pooling.name=attention", "completed", "attention"),
    ]
    assert table[1]["test_auroc"] == ""
    _check_metrics(table[0], _results(out / "1-pooling.name=mean"))

    # `mmcore compare` of two of its runs (same head, other pooling) and an unfinished copy
    mean, attention = out / "1-pooling.name=mean", out / "3-pooling.name=attention"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(attention, unfinished)
    (unfinished / "status.json").write_text(json.dumps({"state": "failed", "error": "out of memory"}))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        compare_command, [str(mean), str(attention), str(unfinished), "--out", str(out), "--format", "csv"]
    )
    assert result.exit_code == 0, result.output
    table = _csv(result.stdout)
    assert list(table[0]) == [
        *FIXED_COLUMNS, "pooling.name", "pooling.params.skip_cls_token", "pooling.params.heads", "pooling.params.dropout"
    ]
    assert [r["run"] for r in table] == [mean.name, attention.name, "unfinished"]
    assert [r["pooling.name"] for r in table] == ["mean", "attention", "attention"]
    _check_metrics(table[0], _results(mean))
    _check_metrics(table[1], _results(attention))
    # a failed run is listed as failed with no metrics, even though its results.json exists
    assert table[2]["status"] == "failed"
    assert all(table[2][c] == "" for c, _ in METRIC_COLUMNS)
    assert (out / "comparison.csv").read_text() == result.stdout
    markdown = (out / "comparison.md").read_text()
    assert markdown.endswith("\n- unfinished: failed: out of memory\n")
    auroc = _results(mean)["test"]["at_threshold"]["auroc"]
    assert f"| {mean.name} | completed | {auroc:.4f} |" in markdown
    missing = CliRunner().invoke(compare_command, [str(tmp_path / "nope")])
    assert missing.exit_code == 0
    assert "| nope | missing |" in missing.output and missing.output.endswith("\n- nope: run directory not found\n")


def test_sweep_data_error_and_crash_fail_their_point_and_ctrl_c_stops(sweep_recipe, registry, tmp_path, monkeypatch):
    import mmcore.commands.run as engine_run

    # a data error stops before the run directory exists: the sweep still marks the point failed
    lines = []
    out = run_sweep(sweep_recipe, [], ["data.test=missing.csv"], out=tmp_path / "data", registry=registry,
                    progress=False, echo=lines.append)
    status = json.loads((out / "1-data.test=missing.csv" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].endswith("missing.csv: file not found")

    # a crash (not an MmcoreError) fails its point, keeps the traceback, and the sweep goes on
    calls = []

    def crash_first(recipe, *, out, **kwargs):
        calls.append(recipe.pooling.name)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory\nmore detail")
        out.mkdir(parents=True)
        (out / "status.json").write_text(json.dumps({"state": "completed"}))
        return out

    monkeypatch.setattr(engine_run, "run_training", crash_first)
    lines = []
    out = run_sweep(sweep_recipe, [], ["pooling.name=mean,attention"], out=tmp_path / "crash", registry=registry,
                    progress=False, echo=lines.append)
    assert calls == ["mean", "attention"]
    assert json.loads((out / "1-pooling.name=mean" / "status.json").read_text())["error"] == (
        "RuntimeError: CUDA out of memory (and 1 more lines)"
    )
    assert "RuntimeError: CUDA out of memory" in (out / "1-pooling.name=mean" / "traceback.txt").read_text()
    assert "sweep: 1 of 2 runs completed, 1 failed:" in lines

    # Ctrl-C ends the sweep at once
    def interrupted(recipe, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_run, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_recipe, [], ["pooling.name=mean,attention"], out=tmp_path / "stop", registry=registry,
                  progress=False, echo=lambda line: None)
    record = json.loads((tmp_path / "stop" / "sweep.json").read_text())
    assert [p["state"] for p in record["points"]] == ["interrupted", "pending"]


def test_sweep_dry_run_lists_the_grid_and_trains_nothing(sweep_recipe, registry, tmp_path):
    lines = []
    out = tmp_path / "dry"
    sweep_dir = run_sweep(
        sweep_recipe, [], [*GRID[:1], "vision.name=fake_cnn,fake_nope"], out=out, dry_run=True,
        registry=registry, progress=False, echo=lines.append,
    )
    assert sweep_dir == out and not out.exists()
    assert lines[0] == f"sweep of {sweep_recipe}: 4 runs (nothing trained) -> {out}"
    assert lines[1] == "  1-pooling.name=mean,vision.name=fake_cnn"
    assert lines[2].startswith(
        f"  2-pooling.name=mean,vision.name=fake_nope  [recipe error: {sweep_recipe} (--set vision.name): "
        "vision.name: unknown vision encoder 'fake_nope'"
    )
    assert [line.split()[0] for line in lines[1:]] == [
        "1-pooling.name=mean,vision.name=fake_cnn",
        "2-pooling.name=mean,vision.name=fake_nope",
        "3-pooling.name=attention,vision.name=fake_cnn",
        "4-pooling.name=attention,vision.name=fake_nope",
    ]


def test_sweep_values_are_split_on_top_level_commas_only():
    assert split_values("mean,attention") == ["mean", "attention"]
    assert split_values("[8],[16, 8]") == ["[8]", "[16, 8]"]
    assert split_values("'a,b',\"c\",{ x = 1, y = 2 }") == ["'a,b'", '"c"', "{ x = 1, y = 2 }"]
    assert parse_sweeps(["a.b=1,2", "c=x"]) == [("a.b", ["1", "2"]), ("c", ["x"])]
    with pytest.raises(RecipeError) as info:
        parse_sweeps(["novalue", "a=1,,2", "b=1", "b=2"])
    assert info.value.problems == [
        "--sweep novalue: expected KEY.PATH=VALUE,VALUE,...",
        "--sweep a=1,,2: empty value (expected KEY.PATH=VALUE,VALUE,...)",
        "--sweep b=2: b is swept twice; give all its values in one --sweep",
    ]


def test_compare_without_runs_or_recipes(tmp_path):
    with pytest.raises(Exception, match="give at least one run directory"):
        compare_runs([])
