"""train.distill: a student learns from a teacher's logits, computed once into the store (never again
for the same teacher and inputs, again for another teacher), resumable, and a vision-only student of a
multimodal teacher trains and exports with no text input."""

import json
from pathlib import Path

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
    # 2 epochs, 64 training and 32 validation rows: the teacher scored each row once, before epoch 1
    assert counted_teacher[teacher_run] == 96
    assert distilled["teacher_rows_scored"] == 96 and distilled["teacher_rows_from_cache"] == 0
    assert distilled["model_version"] == RunScorer(teacher_run, registry=registry).model_version
    # the teacher's validation figures are its own run's; the student's are its results.json's
    teacher_results = json.loads((teacher_run / "results.json").read_text())
    student_results = json.loads((first / "results.json").read_text())
    val = distilled["val"]
    assert val["rows"] == 32 and val["teacher_auroc"] == pytest.approx(teacher_results["val"]["val_auroc"], abs=1e-6)
    assert val["student_auroc"] == pytest.approx(student_results["val"]["val_auroc"], abs=1e-6)
    assert 0 <= val["decision_agreement"] <= 1

    second = _train(recipe, tmp_path / "s2", registry)
    distilled = json.loads((second / "results.json").read_text())["distillation"]
    assert counted_teacher[teacher_run] == 96  # the teacher's forward was not called again
    assert distilled["teacher_rows_scored"] == 0 and distilled["teacher_rows_from_cache"] == 96
    # the same teacher and inputs: the same student, exactly
    assert (first / "test_predictions.json").read_text() == (second / "test_predictions.json").read_text().replace(
        str(second), str(first))

    # another teacher (the same recipe trained with another seed) has its own entries
    other = tiny_recipe("other.toml", experiment="teacher2", seed=11, logging={"tensorboard": False},
                        cache={"dir": str(cache)})
    other_run = _train(other, tmp_path / "t2", registry)
    own_test_split = counted_teacher[other_run]  # its own training scored its test split at the end
    third = _train(_student(tiny_recipe, other_run, cache, name="s3.toml"), tmp_path / "s3", registry)
    assert counted_teacher[other_run] - own_test_split == 96
    assert json.loads((third / "results.json").read_text())["distillation"]["teacher_rows_scored"] == 96


def _unlabelled_copy(csv, out):
    """``csv`` without its label column, image paths absolute: transfer rows."""
    import csv as csvlib

    rows = list(csvlib.DictReader(open(csv, newline="")))
    with open(out, "w", newline="") as f:
        writer = csvlib.DictWriter(f, fieldnames=["local_image_path", "text_info"])
        writer.writeheader()
        writer.writerows({"local_image_path": str(Path(csv).parent / row["local_image_path"]), "text_info": row["text_info"]}
                         for row in rows)
    return out


def test_batches_carry_the_teachers_raw_logit_of_each_row_transfer_rows_unlabelled_and_the_step_learns_the_kd_loss(
        tiny_recipe, teacher_run, registry, demo_data, tmp_path):
    from mmcore.builtin.distill import DistillationLoss
    from mmcore.data.csvs import load_splits, read_split
    from mmcore.engine.step import prepare_batch
    from mmcore.engine.training import TrainingRun
    from mmcore.scoring.run import score_split_with
    from mmcore.scoring.teacher import open_teacher

    transfer = _unlabelled_copy(demo_data / "test.csv", tmp_path / "unlabelled.csv")
    recipe_path = _student(tiny_recipe, teacher_run, tmp_path / "cache")
    recipe = load_recipe(recipe_path, [f'train.distill.transfer="{transfer}"'])
    splits = load_splits(recipe.data)
    training = TrainingRun(recipe, registry, splits, tmp_path / "run", recipe_path, False, _quiet,
                           score_split=None, open_teacher=open_teacher)
    assert training.distillation.summary()["transfer_rows"] == 32
    scorer = RunScorer(teacher_run, registry=registry)
    expected = np.concatenate([score_split_with(scorer, splits["train"])[1],
                               score_split_with(scorer, read_split(transfer, require_label=False))[1]])
    batches = list(training.train_loader)
    rows = np.concatenate([b["index"].numpy() for b in batches])
    assert sorted(rows.tolist()) == list(range(96))  # 64 training rows, then 32 transfer rows
    for batch in batches:
        np.testing.assert_allclose(batch["teacher_logit"].numpy(), expected[batch["index"].numpy()], rtol=0, atol=1e-6)
        assert ((batch["label"] < 0) == (batch["index"] >= 64)).all()  # transfer rows: no label
    batch = next(b for b in batches if (b["label"] < 0).any() and (b["label"] >= 0).any())

    step = training.trainer.step
    assert isinstance(step.distill, DistillationLoss) and step.distill.weight == 0.5 and step.distill.temperature == 2.0
    training.pipeline.model.eval()  # no dropout: the step's forward and this one alike
    with torch.no_grad():
        student = training.pipeline.model(prepare_batch(dict(batch), training.pipeline.device)).logit
        t, s, y = batch["teacher_logit"].double(), student.double().reshape(-1), batch["label"].double()
        pt, ps = torch.sigmoid(t / 2), torch.sigmoid(s / 2)
        kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))  # every row
        labelled = y >= 0
        hard = training.loss_fn(s[labelled].float(), y[labelled].float()).double()  # the labelled rows only
        assert float(step.loss(dict(batch))) == pytest.approx(float(0.5 * 4 * kl.mean() + 0.5 * hard), rel=1e-5)
        # a row the teacher could not read (NaN) adds no soft term: it teaches through its label only
        unread = dict(batch, teacher_logit=batch["teacher_logit"].clone())
        unread["teacher_logit"][0] = float("nan")
        kl[0] = 0
        assert float(step.loss(unread)) == pytest.approx(float(0.5 * 4 * kl.mean() + 0.5 * hard), rel=1e-5)


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


def test_an_online_teacher_scores_every_augmented_batch_and_stores_none_of_it(tiny_recipe, teacher_run, registry, tmp_path):
    from mmcore.data.csvs import load_splits
    from mmcore.engine.training import TrainingRun
    from mmcore.errors import RecipeError
    from mmcore.scoring.run import score_split_with
    from mmcore.scoring.teacher import open_teacher

    cache = tmp_path / "cache"
    recipe_path = _student(tiny_recipe, teacher_run, cache)
    online = ["train.distill.online=true", 'augmentation.name="strong"']
    recipe = load_recipe(recipe_path, online)
    splits = load_splits(recipe.data)
    training = TrainingRun(recipe, registry, splits, tmp_path / "run", recipe_path, False, _quiet,
                           score_split=None, open_teacher=open_teacher)
    batch = next(iter(training.train_loader))
    assert "teacher_logit" not in batch and len(batch["teacher_vision"]) == len(batch["index"])
    augmented = training.distillation.online_logits(batch).numpy()
    _, as_they_are, _ = score_split_with(RunScorer(teacher_run, registry=registry), splits["train"])
    # the teacher saw the augmented images: its logits are not those of the rows as they are
    assert np.abs(augmented - as_they_are[batch["index"].numpy()]).max() > 1e-5  # float32 noise is ~1e-7

    run = run_training(recipe, recipe_path=recipe_path, out=tmp_path / "s", registry=registry, progress=False,
                       echo=_quiet)
    distilled = json.loads((run / "results.json").read_text())["distillation"]
    # 2 epochs of 64 augmented rows, online, nothing of them stored; the 32 validation rows as they are,
    # stored when the TrainingRun above scored them
    assert distilled["teacher_rows_scored"] == 2 * 64 and distilled["teacher_rows_from_cache"] == 32
    assert len(list((cache / "teacher").rglob("*.npy"))) == 1

    with pytest.raises(RecipeError) as refused:
        _train(_student(tiny_recipe, teacher_run, cache, name="plain.toml", **{"distill": {
            "teacher": str(teacher_run), "online": True}}), tmp_path / "plain", registry)
    assert str(refused.value) == (
        f"{tmp_path / 'plain.toml'}: train.distill.online: true needs an image augmentation to teach through "
        f"(augmentation.name is 'none', train.modality 'vision_only'); leave online out and the teacher scores "
        f"each row once")
