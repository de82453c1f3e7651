"""train.distill: a student learns from a teacher's logits, computed once into the store (never again
for the same teacher and inputs, again for another teacher), resumable, and a vision-only student of a
multimodal teacher trains and exports with no text input."""

import json

import numpy as np
import pytest
import torch

from mmcore.commands.run import resume_training, run_training
from mmcore.recipe import load_recipe
from mmcore.scoring.run import RunScorer


def _quiet(line):
    pass


def _train(path, out, registry, on_epoch_end=None):
    return run_training(load_recipe(path), recipe_path=path, out=out, registry=registry, progress=False, echo=_quiet,
                        on_epoch_end=on_epoch_end)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, demo_data, registry):
    """A multimodal tiny teacher (fake CNN + fake text), one epoch."""
    import tomli_w
    from tiny import tiny_recipe_data

    tmp = tmp_path_factory.mktemp("teacher")
    recipe = tmp / "teacher.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_data(demo_data, experiment="teacher", logging={"tensorboard": False},
                                                     cache={"dir": str(tmp / "cache")})))
    return _train(recipe, tmp / "run", registry)


@pytest.fixture
def counted_teacher(monkeypatch):
    """Rows each run directory's scorer (its forward) scored since the test began, by directory."""
    from collections import Counter

    calls = Counter()
    forward = RunScorer.logits

    def counting(self, vision_items, texts):
        logits = forward(self, vision_items, texts)
        calls[self.source] += len(logits)
        return logits

    monkeypatch.setattr(RunScorer, "logits", counting)
    return calls


def _student(tiny_recipe, teacher, cache, name="student.toml", **train):
    return tiny_recipe(name, experiment="student", logging={"tensorboard": False}, cache={"dir": str(cache)},
                       train={"modality": "vision_only", "epochs": 2, "early_stopping": {"patience": 0},
                              "distill": {"teacher": str(teacher), "temperature": 2.0, "weight": 0.5}, **train})


def test_teacher_logits_are_scored_once_then_read_from_the_store_and_a_changed_teacher_is_scored_again(
        tiny_recipe, teacher_run, registry, counted_teacher, tmp_path):
    cache = tmp_path / "cache"
    recipe = _student(tiny_recipe, teacher_run, cache)
    first = _train(recipe, tmp_path / "s1", registry)
    distilled = json.loads((first / "results.json").read_text())["distillation"]
    # 2 epochs, 64 training rows: the teacher scored each row once, before epoch 1
    assert counted_teacher[teacher_run] == 64
    assert distilled["teacher_rows_scored"] == 64 and distilled["teacher_rows_from_cache"] == 0
    assert distilled["model_version"] == RunScorer(teacher_run, registry=registry).model_version

    second = _train(recipe, tmp_path / "s2", registry)
    distilled = json.loads((second / "results.json").read_text())["distillation"]
    assert counted_teacher[teacher_run] == 64  # the teacher's forward was not called again
    assert distilled["teacher_rows_scored"] == 0 and distilled["teacher_rows_from_cache"] == 64
    # the same teacher and inputs: the same student, exactly
    assert (first / "test_predictions.json").read_text() == (second / "test_predictions.json").read_text().replace(
        str(second), str(first))

    # another teacher (the same recipe trained with another seed) has its own entries
    other = tiny_recipe("other.toml", experiment="teacher2", seed=11, logging={"tensorboard": False},
                        cache={"dir": str(cache)})
    other_run = _train(other, tmp_path / "t2", registry)
    own_test_split = counted_teacher[other_run]  # its own training scored its test split at the end
    third = _train(_student(tiny_recipe, other_run, cache, name="s3.toml"), tmp_path / "s3", registry)
    assert counted_teacher[other_run] - own_test_split == 64
    assert json.loads((third / "results.json").read_text())["distillation"]["teacher_rows_scored"] == 64


def test_a_batch_carries_the_teachers_raw_logit_of_each_row_and_the_step_learns_from_the_kd_loss(
        tiny_recipe, teacher_run, registry, tmp_path):
    from mmcore.builtin.distill import DistillationLoss
    from mmcore.data.csvs import load_splits
    from mmcore.engine.step import prepare_batch
    from mmcore.engine.training import TrainingRun
    from mmcore.scoring.run import score_split_with
    from mmcore.scoring.teacher import open_teacher

    recipe_path = _student(tiny_recipe, teacher_run, tmp_path / "cache")
    recipe = load_recipe(recipe_path)
    splits = load_splits(recipe.data)
    training = TrainingRun(recipe, registry, splits, tmp_path / "run", recipe_path, False, _quiet,
                           score_split=None, open_teacher=open_teacher)
    scorer = RunScorer(teacher_run, registry=registry)
    positions, expected, _ = score_split_with(scorer, splits["train"])
    assert positions.tolist() == list(range(64))
    batch = next(iter(training.train_loader))
    rows = batch["index"].numpy()
    np.testing.assert_allclose(batch["teacher_logit"].numpy(), expected[rows], rtol=0, atol=1e-6)

    step = training.trainer.step
    assert isinstance(step.distill, DistillationLoss) and step.distill.weight == 0.5 and step.distill.temperature == 2.0
    training.pipeline.model.eval()  # no dropout: the step's forward and this one alike
    with torch.no_grad():
        student = training.pipeline.model(prepare_batch(dict(batch), training.pipeline.device)).logit
        t, s, y = batch["teacher_logit"].double(), student.double().reshape(-1), batch["label"].double()
        pt, ps = torch.sigmoid(t / 2), torch.sigmoid(s / 2)
        kl = (pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))).mean()
        hand = 0.5 * 4 * kl + 0.5 * training.loss_fn(s.float(), y.float()).double()
        assert float(step.loss(dict(batch))) == pytest.approx(float(hand), rel=1e-5)


def test_a_vision_only_student_of_a_multimodal_teacher_exports_a_graph_with_no_text_input(
        tiny_recipe, teacher_run, registry, tmp_path):
    from mmcore.commands.export import export_run

    assert json.loads((teacher_run / "results.json").read_text())  # the teacher reads text: multimodal
    assert load_recipe(teacher_run / "recipe.toml").train.modality == "multimodal"
    student = _train(_student(tiny_recipe, teacher_run, tmp_path / "cache"), tmp_path / "s", registry)
    bundle = tmp_path / "bundle"
    export_run(student, bundle, registry=registry, progress=False, echo=_quiet)
    graph = json.loads((bundle / "manifest.json").read_text())["graph"]
    assert graph["text_inputs"] == [] and graph["inputs"] == graph["vision_inputs"]


def _stop_after_epoch_1(epoch, metrics):
    if epoch == 1:
        raise KeyboardInterrupt  # as a second Ctrl-C would: last.ckpt of epoch 1 is written


def test_a_distilled_run_resumes_to_the_uninterrupted_result_without_the_teacher_and_refuses_another_teacher(
        tiny_recipe, teacher_run, registry, counted_teacher, tmp_path):
    from mmcore.errors import RecipeError

    recipe = _student(tiny_recipe, teacher_run, tmp_path / "cache")
    straight = _train(recipe, tmp_path / "straight", registry)
    scored = counted_teacher[teacher_run]
    with pytest.raises(KeyboardInterrupt):
        _train(recipe, tmp_path / "stopped", registry, on_epoch_end=_stop_after_epoch_1)
    stopped = tmp_path / "stopped"
    state = torch.load(stopped / "last.ckpt", weights_only=True)
    assert state["distill_teacher"] == RunScorer(teacher_run, registry=registry).model_version

    torch.save({**state, "distill_teacher": "sha256:0123456789abcdef"}, stopped / "other.ckpt")
    (stopped / "last.ckpt").rename(stopped / "kept.ckpt")
    (stopped / "other.ckpt").rename(stopped / "last.ckpt")
    with pytest.raises(RecipeError) as refused:
        resume_training(stopped, registry=registry, progress=False, echo=_quiet)
    assert str(refused.value) == (
        f"{stopped / 'last.ckpt'}: train.distill.teacher: {teacher_run} is {state['distill_teacher']}, but this run was "
        f"trained with sha256:0123456789abcdef; resume with that teacher or start a new run")
    assert refused.value.exit_code == 2

    (stopped / "kept.ckpt").replace(stopped / "last.ckpt")
    resume_training(stopped, registry=registry, progress=False, echo=_quiet)
    assert counted_teacher[teacher_run] == scored  # every logit came from the store
    predictions = [(p["path"], p["score"]) for p in json.loads((stopped / "test_predictions.json").read_text())]
    assert predictions == [(p["path"], p["score"]) for p in json.loads((straight / "test_predictions.json").read_text())]


def test_recipe_keys_are_checked_one_line_each(recipe_file, tmp_path):
    from mmcore.errors import RecipeError

    path = recipe_file('[data]\nbase_dir = "/tmp"\n[train.distill]\nteacher = " "\ntemperature = -1\nweight = 2\n'
                       'teachers = "x"\n')
    with pytest.raises(RecipeError) as bad:
        load_recipe(path)
    assert bad.value.problems == [f"{path}: train.distill.teachers: unknown key (did you mean teacher?)"]
    for override, line in [
        ("train.distill.temperature=0", "train.distill.temperature: must be a finite number > 0 (got 0.0)"),
        ("train.distill.weight=1.5", "train.distill.weight: must be in [0.0, 1.0] (got 1.5)"),
    ]:
        good = recipe_file(f'[data]\nbase_dir = "/tmp"\n[train.distill]\nteacher = "{tmp_path}"\n', name="good.toml")
        with pytest.raises(RecipeError) as bad:
            load_recipe(good, [override])
        assert bad.value.problems == [f"{good} (--set {override.split('=')[0]}): {line}"]
    assert load_recipe(good).train.distill.temperature == 2.0 and load_recipe(good).train.distill.weight == 0.7


def test_a_teacher_that_is_not_a_model_or_reads_text_the_rows_lack_is_one_line(tiny_recipe, demo_data, registry,
                                                                               teacher_run, tmp_path):
    import csv

    from mmcore.errors import RecipeError

    missing = tmp_path / "nowhere"
    with pytest.raises(RecipeError) as bad:
        _train(_student(tiny_recipe, missing, tmp_path / "cache"), tmp_path / "s", registry)
    assert str(bad.value) == (f"{tmp_path / 'student.toml'}: train.distill.teacher: {missing}: neither a run "
                              f"directory nor an export bundle (not found)")

    rows = list(csv.DictReader(open(demo_data / "train.csv", newline="")))
    textless = tmp_path / "train_textless.csv"
    with open(textless, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "text_info": "", "local_image_path": str(demo_data / row["local_image_path"])}
                         for row in rows)
    recipe = tiny_recipe("textless.toml", experiment="student", logging={"tensorboard": False},
                         cache={"dir": str(tmp_path / "cache")}, data={"train": str(textless)},
                         train={"modality": "vision_only", "distill": {"teacher": str(teacher_run)}})
    with pytest.raises(RecipeError) as bad:
        _train(recipe, tmp_path / "t", registry)
    assert str(bad.value) == (f"{recipe}: train.distill.teacher: the teacher reads text, but {textless} has no text "
                              f"(an empty or absent text_info column) and data.ocr is not set")


def test_the_teacher_logits_tenant_keys_by_content_and_teacher_and_verify_finds_a_damaged_file(tmp_path):
    from mmcore.store.teacher import TeacherLogits, row_key
    from mmcore.store.tenants import clear_cache, tenants_info, verify_cache

    image = b"\x01" * 20
    keys = [row_key(image, "buy now"), row_key(image, "buy later"), row_key(image, None), row_key(None, "buy now")]
    assert len(set(keys)) == 4  # another text, no text, no image: other inputs
    store = TeacherLogits(tmp_path, "sha256:aaaa")
    store.put(keys[:2], [1.5, -2.25])
    np.testing.assert_array_equal(store.get(keys), [1.5, -2.25, np.nan, np.nan])
    assert np.isnan(TeacherLogits(tmp_path, "sha256:bbbb").get(keys[:1])).all()  # another teacher: nothing
    (info,) = [t for t in tenants_info(tmp_path) if t["name"] == "teacher-logits"]
    assert info["entries"] == 1 and info["version"] == 1

    (records,) = store.dir.glob("*.npy")
    records.write_bytes(records.read_bytes()[:-3] + b"xyz")
    report = verify_cache(tmp_path)
    assert report["problems"] == [f"{records}: damaged teacher logits (contents do not match the checksum in its name)"]
    assert np.isnan(store.get(keys[:1])).all()  # a damaged file is never read: the teacher scores again
    assert [t["name"] for t in clear_cache(tmp_path, tenants=["teacher-logits"])] == ["teacher-logits"]
    assert not store.dir.exists()
