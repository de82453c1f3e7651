"""``mmcore ensemble``: finished runs -> one directory that eval, predict, compare and serve take like a run.

The ensemble's score is the weighted mean of its members' raw scores (probabilities), so every
check below compares a command's ``score`` with ``sum_m w_m * score_m`` of the members' own runs.
"""

import csv
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import Server

from mmcore.errors import RunError

@pytest.fixture(scope="module")
def member_runs(tmp_path_factory, exportable_run):
    """Two finished runs of one recipe with different seeds: the shared ``exportable_run`` (fake_cnn +
    a tiny MiniLM, seed 3) and the same recipe at seed 11."""
    import attrs

    from mmcore.commands.run import run_training
    from mmcore.rundir import RunDir

    tmp = tmp_path_factory.mktemp("members")
    recipe = RunDir(exportable_run).load_recipe()
    other = run_training(attrs.evolve(recipe, seed=11, experiment="seed11"), recipe_path=RunDir(exportable_run).recipe_file,
                         out=tmp / "run11", progress=False, echo=lambda line: None)
    return [exportable_run, other]


@pytest.fixture(scope="module")
def ensemble(member_runs, tmp_path_factory):
    """``build_ensemble`` of the two runs, log-loss selection started from both members (both kept)."""
    from mmcore.commands.ensemble import build_ensemble

    out = tmp_path_factory.mktemp("ens") / "ensemble"
    lines = []
    summary = build_ensemble(member_runs, out, metric="log_loss", iterations=3, initial_best=2, progress=False, echo=lines.append)
    return summary, lines


def _scores(path):
    """``{image file name: score}`` of test_predictions.json or a predictions CSV."""
    from conftest import scores_by_image

    return scores_by_image(path)


def _weighted_mean(ensemble_dir, member_runs):
    record = json.loads((ensemble_dir / "ensemble.json").read_text())
    weights = [m["weight"] for m in record["members"]]
    members = [_scores(run / "test_predictions.json") for run in member_runs]
    return {name: sum(w * m[name] for w, m in zip(weights, members)) for name in members[0]}, weights


def test_the_directory_records_members_weights_and_decision(ensemble, member_runs):
    summary, lines = ensemble
    out = summary.out
    record = json.loads((out / "ensemble.json").read_text())
    assert record["kind"] == "mmcore-ensemble" and record["format"] == 1 and record["source"] == "runs"
    assert [m["dir"] for m in record["members"]] == ["members/0-exportable", "members/1-seed11"]
    weights = [m["weight"] for m in record["members"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    assert [m["count"] for m in record["members"]] == list(record["selection"]["counts"])
    assert record["selection"]["metric"] == "log_loss" and record["selection"]["rows"] == "val"
    # members are linked in, not pointed at: the same bytes, no optimizer state
    for member, run in zip(record["members"], member_runs):
        folder = out / member["dir"]
        assert (folder / "checkpoint_best.ckpt").read_bytes() == (run / "checkpoint_best.ckpt").read_bytes()
        assert not (folder / "last.ckpt").exists()
    decision = json.loads((out / "decision.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert results["decision"] == decision and results["kind"] == "ensemble"
    assert [m["weight"] for m in results["members"]] == weights
    assert lines[-1] == f"wrote {out}"


def test_eval_scores_are_the_weighted_mean_of_the_members(ensemble, member_runs, tmp_path):
    """``eval ENSEMBLE`` = the ensemble's own results = sum_m w_m * member score, row by row."""
    from mmcore.commands.evaluate import evaluate

    out = ensemble[0].out
    want, weights = _weighted_mean(out, member_runs)
    assert min(weights) > 0  # a real mixture, not one member
    evaluated = evaluate(out, out=tmp_path / "eval", progress=False, echo=lambda line: None)
    got = _scores(evaluated / "test_predictions.json")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-6)
    assert _scores(out / "test_predictions.json") == pytest.approx(got, abs=1e-9)
    # and it is not the mean of logits: that would differ on these rows
    logit_mean = {name: 1 / (1 + np.exp(-sum(w * np.log(m[name] / (1 - m[name]))
                                             for w, m in zip(weights, [_scores(r / "test_predictions.json")
                                                                       for r in member_runs]))))
                  for name in want}
    assert max(abs(logit_mean[n] - got[n]) for n in want) > 1e-5  # 10x the tolerance above


def test_predict_scores_are_the_weighted_mean_and_apply_the_ensembles_decision(ensemble, member_runs, demo_data,
                                                                               tmp_path):
    from mmcore.commands.predict import predict_csv

    out = ensemble[0].out
    want, _ = _weighted_mean(out, member_runs)
    lines = []
    summary = predict_csv(out, demo_data / "test.csv", tmp_path / "scored.csv", progress=False, echo=lines.append)
    decision = json.loads((out / "decision.json").read_text())
    with open(tmp_path / "scored.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        name = row["local_image_path"].rsplit("/", 1)[-1]
        assert float(row["score"]) == pytest.approx(want[name], abs=1e-6)
        p = min(max(want[name], 2.0**-23), 1 - 2.0**-23)
        calibrated = 1 / (1 + np.exp(-np.log(p / (1 - p)) / decision["temperature"]))
        assert float(row["calibrated_score"]) == pytest.approx(calibrated, abs=1e-6)
        assert row["prediction"] == str(float(row["calibrated_score"]) >= decision["threshold"])
    assert summary.threshold == decision["threshold"]
    assert lines[0].startswith(f"scored {len(rows)} of {len(rows)} rows of {demo_data / 'test.csv'} with ensemble {out} on cpu")


def test_compare_shows_the_ensemble_as_one_column(ensemble, member_runs):
    from mmcore.evaluation.comparison import compare_runs

    out = ensemble[0].out
    table = compare_runs([*member_runs, out])
    row = table.rows[-1]
    assert row["status"] == "completed"
    assert row["test_auroc"] == json.loads((out / "results.json").read_text())["test"]["at_threshold"]["auroc"]


def test_serve_answers_the_weighted_mean(ensemble, member_runs, demo_data, tmp_path):
    """A real ``mmcore serve ENSEMBLE`` over HTTP: each answer's score is the members' weighted mean."""
    out = ensemble[0].out
    want, _ = _weighted_mean(out, member_runs)
    with open(demo_data / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:4]
    server = Server(out, "--text", "optional", "--device", "cpu", log=tmp_path / "serve.log")
    try:
        with httpx.Client(timeout=60) as client:
            metadata = client.get(f"{server.url}/metadata").json()
            assert metadata["kind"] == "ensemble"
            assert [m["dir"] for m in metadata["members"]] == ["members/0-exportable", "members/1-seed11"]
            for row in rows:
                image = (demo_data / row["local_image_path"]).read_bytes()
                answer = client.post(f"{server.url}/predict", files={"image": ("ad.jpg", image, "image/jpeg")},
                                     data={"text": row["text_info"]}).json()
                assert answer["score"] == pytest.approx(want[row["local_image_path"].rsplit("/", 1)[-1]], abs=1e-6)
    finally:
        assert server.stop() == 0, server.output()


def _copy_with_record(src, dst, change):
    shutil.copytree(src, dst)
    record = json.loads((dst / "ensemble.json").read_text())
    change(record)
    (dst / "ensemble.json").write_text(json.dumps(record))
    return dst


@pytest.mark.parametrize("change, line", [
    (lambda r: r["members"][0].update(dir="../run3"), "members[0].dir: '../run3' is not a folder inside members/ "
                                                      "(an ensemble names only its own members)"),
    (lambda r: r["members"][0].update(dir="/tmp/run3"), "members[0].dir: '/tmp/run3' is not a folder inside members/ "
                                                        "(an ensemble names only its own members)"),
    (lambda r: r["members"][1].update(dir="members/nothing"), "members[1].dir: 'members/nothing' is not a run "
                                                              "directory (no such folder)"),
    (lambda r: [m.update(weight=w) for m, w in zip(r["members"], (2.0, 1.0))], "members[*].weight: must sum to 1 (got 3)"),
    (lambda r: r["members"][0].update(module="os.system"), "members[0].module: unknown key"),
    (lambda r: r["members"][0].update(checkpoint_sha256="0" * 64),
     "members[0].checkpoint_sha256: members/0-exportable/checkpoint_best.ckpt changed since the ensemble was made"),
])
def test_a_record_that_names_anything_else_is_one_line(ensemble, tmp_path, change, line):
    from mmcore.scoring.scorers import open_scorer

    broken = _copy_with_record(ensemble[0].out, tmp_path / "broken", change)
    with pytest.raises(RunError) as caught:
        open_scorer(broken)
    assert str(caught.value) == f"{broken / 'ensemble.json'}: {line}"


def test_cli_refuses_a_folder_that_is_not_a_run_in_one_line(cli, member_runs, tmp_path):
    (tmp_path / "notarun").mkdir()
    result = cli("ensemble", member_runs[0], tmp_path / "notarun", "--out", tmp_path / "ens", check=False)
    assert result.returncode == 4
    assert result.stderr.strip() == f"{tmp_path / 'notarun'}: not an mmcore run directory (no status.json)"
    assert not (tmp_path / "ens").exists()


def test_run_seeds_trains_the_members_and_their_ensemble(tiny_recipe, tmp_path):
    """``run --seeds 2``: seeds s and s+1 in OUT/members/seed-<s>/, the ensemble over them in OUT."""
    from mmcore.commands.ensemble import train_seed_ensemble

    recipe = tiny_recipe(cache={"dir": str(tmp_path / "cache")}, logging={"tensorboard": False})
    out = tmp_path / "seeds"
    summary = train_seed_ensemble(recipe, seeds=2, out=out, progress=False, echo=lambda line: None)
    record = json.loads((out / "ensemble.json").read_text())
    assert record["source"] == "seeds"
    assert [m["dir"] for m in record["members"]] == ["members/seed-3", "members/seed-4"]
    import tomllib

    assert [tomllib.loads((out / m["dir"] / "recipe.toml").read_text())["seed"] for m in record["members"]] == [3, 4]
    want, _ = _weighted_mean(out, [out / m["dir"] for m in record["members"]])
    assert _scores(out / "test_predictions.json") == pytest.approx(want, abs=1e-6)
    assert summary.out == out


@pytest.fixture(scope="module")
def ensemble_bundle(ensemble, tmp_path_factory):
    """``mmcore export ENSEMBLE`` (ONNX, the parity gate on the validation split)."""
    from mmcore.commands.export import export_run

    out = tmp_path_factory.mktemp("ens-bundle") / "bundle"
    lines = []
    summary = export_run(ensemble[0].out, out, progress=False, echo=lines.append)
    return out, summary, lines


def test_export_writes_one_graph_that_passes_parity_and_scores_as_the_ensemble(ensemble, ensemble_bundle, demo_data,
                                                                                tmp_path):
    """One bundle, opened by BundleScorer as any bundle: its scores are the ensemble directory's (1e-5)."""
    from mmcore.commands.predict import predict_csv
    from mmcore.scoring.scorers import open_scorer

    out, summary, lines = ensemble_bundle
    assert summary.parity["passed"] and summary.parity["max_abs_calibrated_score_diff"] < 1e-5
    manifest = json.loads((out / "manifest.json").read_text())
    record = json.loads((ensemble[0].out / "ensemble.json").read_text())
    assert [m["dir"] for m in manifest["ensemble"]["members"]] == [m["dir"] for m in record["members"]]
    assert [m["weight"] for m in manifest["ensemble"]["members"]] == pytest.approx([m["weight"] for m in record["members"]])
    assert json.loads((out / "decision.json").read_text()) == json.loads((ensemble[0].out / "decision.json").read_text())
    scorer = open_scorer(out)
    assert scorer.kind == "bundle"
    predict_csv(out, demo_data / "test.csv", tmp_path / "bundle.csv", progress=False, echo=lambda line: None)
    got, want = _scores(tmp_path / "bundle.csv"), _scores(ensemble[0].out / "test_predictions.json")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-5)


def test_a_shared_frozen_encoder_is_in_the_graph_once(ensemble_bundle, member_runs):
    """Both members read the same frozen MiniLM: the graph holds its word embeddings once; their
    fine-tuned heads (and fake_cnn, trained per seed) twice."""
    import onnx
    import torch

    out, _, _ = ensemble_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ensemble"]["shared_encoders"]["text"] == [[0, 1]]
    assert manifest["ensemble"]["shared_encoders"]["vision"] == [[0], [1]]
    state = torch.load(member_runs[0] / "checkpoint_best.ckpt", weights_only=True)["model"]
    embeddings = next(v for k, v in state.items() if k.startswith("text.") and "word_embeddings" in k)
    graph = onnx.load(str(out / "model.onnx"))
    same = [t for t in graph.graph.initializer if tuple(t.dims) == tuple(embeddings.shape)]
    assert len(same) == 1


def test_run_folds_bags_the_members_with_a_decision_from_out_of_fold_scores(tiny_recipe, tmp_path):
    """``run --folds 2``: members/fold-<i>/, equal weights, the temperature and threshold fitted on the
    out-of-fold scores (each from the member that held its row out), the test split only measured."""
    from mmcore.commands.ensemble import train_fold_bag
    from mmcore.engine.training import fit_decision
    from mmcore.evaluation.ensemble import combined_logit
    from mmcore.evaluation.oof import read_oof_scores
    from mmcore.recipe import load_recipe

    recipe = tiny_recipe(cache={"dir": str(tmp_path / "cache")}, logging={"tensorboard": False})
    out = tmp_path / "bag"
    lines = []
    summary = train_fold_bag(recipe, folds=2, out=out, progress=False, echo=lines.append)
    record = json.loads((out / "ensemble.json").read_text())
    assert record["source"] == "folds"
    assert [(m["dir"], m["weight"]) for m in record["members"]] == [("members/fold-0", 0.5), ("members/fold-1", 0.5)]
    assert record["selection"]["rows"] == "out-of-fold" and record["selection"]["n"] == 64 + 32
    # each row's out-of-fold score is its own fold's member's, which never trained on it
    table = read_oof_scores(out / "oof_scores.csv")
    def names(csv_path):
        with open(csv_path, newline="") as handle:
            return {row["local_image_path"].rsplit("/", 1)[-1] for row in csv.DictReader(handle)}

    for fold in (0, 1):
        scored = {image.rsplit("/", 1)[-1] for image, f in zip(table.image, table.oof.folds) if f == fold}
        assert scored == names(out / "folds" / f"fold-{fold}" / "val.csv")
        assert not scored & names(out / "folds" / f"fold-{fold}" / "train.csv")
    # the decision is the out-of-fold one
    oof = table.oof
    want = fit_decision(load_recipe(recipe), combined_logit(1 / (1 + np.exp(-oof.logits))), oof.labels)
    decision = json.loads((out / "decision.json").read_text())
    assert decision["threshold"] == pytest.approx(want["threshold"]) and decision["temperature"] == pytest.approx(
        want["temperature"])
    results = json.loads((out / "results.json").read_text())
    assert results["oof"]["n"] == 96 and results["data"] == {"oof": 96, "test": 32}
    assert results["oof"]["auroc"] == pytest.approx(summary.val_auroc)
    # the test scores are the members' mean
    mean, _ = _weighted_mean(out, [out / m["dir"] for m in record["members"]])
    assert _scores(out / "test_predictions.json") == pytest.approx(mean, abs=1e-6)
    assert lines[-2].startswith("out-of-fold AUROC ")


def test_members_measured_on_other_rows_are_one_line(member_runs, tmp_path):
    """A member whose validation CSV differs (by content) from the first member's is refused before
    anything is scored, naming it; nothing is left behind."""
    import re

    from mmcore.commands.ensemble import build_ensemble
    from mmcore.errors import DataError
    from mmcore.rundir import RunDir

    other = tmp_path / "other-run"
    shutil.copytree(member_runs[1], other)
    val = RunDir(other).load_recipe().data
    rows = (Path(val.base_dir) / val.val).read_text().splitlines()
    (tmp_path / "val.csv").write_text("\n".join(rows[:-1]) + "\n")
    recipe = (other / "recipe.toml").read_text()
    (other / "recipe.toml").write_text(re.sub(r'(?m)^val = .*$', f"val = {str(tmp_path / 'val.csv')!r}", recipe))
    with pytest.raises(DataError) as caught:
        build_ensemble([member_runs[0], other], tmp_path / "ens", progress=False, echo=lambda line: None)
    assert str(caught.value) == (f"{other}: its val CSV differs from {member_runs[0]}'s; an ensemble's members are "
                                 f"selected and measured on the same rows")
    assert not (tmp_path / "ens").exists()


@pytest.mark.parametrize("flags, line", [
    (["--seeds", "2", "--nproc", "2"], "--seeds and --folds train their runs one after another: no --nproc, --resume or --sweep"),
    (["--seeds", "2", "--folds", "2"], "--seeds or --folds, not both"),
    (["--group-column", "campaign"], "--group-column groups the rows of --folds"),
])
def test_run_seeds_and_folds_usage_is_one_line(cli, tiny_recipe, flags, line):
    result = cli("run", tiny_recipe(), *flags, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"Error: {line}"


def test_equal_weights_select_nothing(member_runs, tmp_path):
    """``--weights equal``: every member once, the decision still fitted on validation, the test scores the plain mean."""
    from mmcore.commands.ensemble import build_ensemble

    summary = build_ensemble(member_runs, tmp_path / "ens", weighting="equal", progress=False, echo=lambda line: None)
    record = json.loads((summary.out / "ensemble.json").read_text())
    assert [m["weight"] for m in record["members"]] == [0.5, 0.5]
    assert record["selection"] == {"metric": None, "weights": "equal", "rows": "val", "n": 32}
    mean = {n: (a + b) / 2 for (n, a), b in zip(_scores(member_runs[0] / "test_predictions.json").items(),
                                                 _scores(member_runs[1] / "test_predictions.json").values())}
    assert _scores(summary.out / "test_predictions.json") == pytest.approx(mean, abs=1e-6)


def test_an_ensemble_that_fails_after_linking_its_members_leaves_no_folder(member_runs, tmp_path, monkeypatch):
    """A failure once members are linked (here: scoring them) removes the half-made directory, and is raised as it was."""
    from mmcore.commands import ensemble as command

    def failing(out, member_dirs, **kwargs):
        assert all(Path(d).is_dir() for d in member_dirs)  # the members were linked under out/members/
        raise RunError("scoring failed")

    monkeypatch.setattr(command, "assemble_ensemble", failing)
    with pytest.raises(RunError, match="^scoring failed$"):
        command.build_ensemble(member_runs, tmp_path / "ens", progress=False, echo=lambda line: None)
    assert not (tmp_path / "ens").exists()
