"""``mmcore drift`` and the reference profile: written at the end of a run from its held-out rows as one
safetensors file, carried in the bundle (listed in its manifest like every file), exit 10 on a shifted
set and 0 on fresh rows of the same kind, from a run and from a bundle; a damaged or missing profile
is one line; older runs and bundles, with a ``reference_profile/`` folder, still drift."""

import csv
import json
import shutil

import numpy as np
import pytest
import tomli_w
from conftest import mmcore_cli
from older_profile import write_profile_folder
from PIL import Image
from tiny import tiny_recipe_data

from mmcore.commands.drift import drift, reference_profile
from mmcore.errors import RunError
from mmcore.export.bundle import file_entries, sha256_file
from mmcore.quality.drift import DRIFT_EXIT_CODE
from mmcore.quality.profile import read_profile, score_histogram


@pytest.fixture(scope="module")
def drift_setup(tmp_path_factory):
    """A run trained long enough that its scores spread over several buckets, its bundle, fresh demo
    rows (another seed: the same kind of ads) and a shifted set (resized, rotated, inverted images, no text)."""
    from mmcore.commands.demo import make_demo_dataset
    from mmcore.commands.export import export_run
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    root = tmp_path_factory.mktemp("drift")
    data = make_demo_dataset(root / "demo", n_train=64, n_val=64, n_test=64, size=(48, 48))
    fresh = make_demo_dataset(root / "fresh", n_train=4, n_val=4, n_test=96, size=(48, 48), seed=5)
    recipe = root / "r.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_data(
        data, cache={"dir": str(root / "cache")}, logging={"tensorboard": False}, text={"name": "minilm", "params": {"tiny": True}},
        train={"epochs": 12, "learning_rate": 0.03}, eval={"calibrate": False},
    )), encoding="utf-8")
    quiet = lambda line: None  # noqa: E731
    run = run_training(load_recipe(recipe), recipe_path=recipe, out=root / "run",
                       progress=False, echo=quiet)
    bundle = root / "bundle"
    export_run(run, bundle, progress=False, echo=quiet)
    shifted = root / "shifted"
    shifted.mkdir()
    with open(fresh / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(shifted / "new.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["local_image_path", "text_info"])
        for i, row in enumerate(rows):
            image = Image.open(fresh / row["local_image_path"]).convert("RGB").resize((96, 64)).rotate(90)
            Image.eval(image, lambda v: 255 - v).save(shifted / f"{i}.jpg")
            writer.writerow([f"{i}.jpg", ""])
    return {"data": data, "run": run, "bundle": bundle, "fresh": fresh / "test.csv", "shifted": shifted / "new.csv"}


def test_a_run_keeps_a_profile_of_its_held_out_rows(drift_setup, tmp_path):
    from mmcore.commands.predict import predict_csv

    run = drift_setup["run"]
    profile = read_profile(run / "reference_profile.safetensors")
    assert not (run / "reference_profile").exists()  # one file, not the older folder
    results = json.loads((run / "results.json").read_text())
    assert profile.rows == 128 and profile.threshold == results["decision"]["threshold"]
    calibrated = []
    for split in ("val", "test"):  # the held-out rows, scored as mmcore predict scores them
        predict_csv(run, drift_setup["data"] / f"{split}.csv", tmp_path / f"{split}.csv",
                    progress=False, echo=lambda line: None)
        with open(tmp_path / f"{split}.csv", newline="") as handle:
            calibrated += [float(row["calibrated_score"]) for row in csv.DictReader(handle)]
    assert list(profile.score_counts) == score_histogram(calibrated).tolist()
    assert sum(c > 0 for c in profile.score_counts) >= 3  # the scores spread: a PSI can move
    np.testing.assert_allclose(np.sort(profile.sample_scores), np.sort(calibrated), atol=1e-6)
    assert profile.positives == sum(s >= profile.threshold for s in calibrated)
    assert set(profile.embeddings) == {"image", "text"} and profile.embeddings["image"].shape[0] == 128


def test_the_bundle_carries_the_profile_in_its_manifest(drift_setup):
    run, bundle = drift_setup["run"], drift_setup["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    profile = run / "reference_profile.safetensors"
    assert (bundle / "reference_profile.safetensors").read_bytes() == profile.read_bytes()
    assert manifest["files"]["reference_profile.safetensors"] == {"sha256": sha256_file(profile),
                                                                   "bytes": profile.stat().st_size}
    assert not (bundle / "reference_profile").exists() and not any("/" in name and name.startswith("reference_profile")
                                                                   for name in manifest["files"])


def test_drift_exits_10_on_a_shifted_set(drift_setup, tmp_path):
    shifted = mmcore_cli("drift", drift_setup["run"], drift_setup["shifted"], "--out", tmp_path / "a", "--quiet",
                         check=False)
    assert shifted.returncode == DRIFT_EXIT_CODE, shifted.stderr
    lines = shifted.stdout.splitlines()
    assert lines[0].startswith("96 new rows against 128 reference rows: image domain AUROC ")
    assert lines[1].startswith("drift: image domain AUROC ") and "score PSI" in lines[1]
    report = json.loads((tmp_path / "a" / "drift.json").read_text())
    assert report["drift"] is True and report["exit_code"] == 10 and report["domain_auroc"]["image"]["auroc"] >= 0.9
    assert (tmp_path / "a" / "drift.html").is_file() and (tmp_path / "a" / "drift_files" / "score_histogram.png").is_file()

def test_fresh_rows_do_not_drift_and_from_a_bundle_the_score_shift_alone_decides(drift_setup, tmp_path):
    quiet = lambda line: None  # noqa: E731
    from_bundle = drift(drift_setup["bundle"], drift_setup["shifted"], out=tmp_path / "b",
                        progress=False, echo=quiet)
    from_run = drift(drift_setup["run"], drift_setup["shifted"], out=tmp_path / "r", progress=False,
                     echo=quiet)
    assert from_bundle.exit_code == DRIFT_EXIT_CODE and from_bundle.domain_auroc == {}
    assert from_bundle.reasons == (f"score PSI {from_bundle.score['psi']:.3f} >= 0.25",)
    assert "a bundle gives no per-modality features: the domain AUROC needs a run directory" in from_bundle.notes
    assert from_bundle.score["new_counts"] == from_run.score["new_counts"]  # the bundle scores as the run does
    fresh = drift(drift_setup["run"], drift_setup["fresh"], out=tmp_path / "f", progress=False, echo=quiet)
    assert fresh.exit_code == 0 and max(v["auroc"] for v in fresh.domain_auroc.values()) < 0.75
    fresh = drift(drift_setup["bundle"], drift_setup["fresh"], out=tmp_path / "fb", progress=False, echo=quiet)
    assert fresh.exit_code == 0 and fresh.score["psi"] < 0.25


def test_a_damaged_or_missing_profile_is_one_line(drift_setup, tmp_path):
    """Through mmcore drift, before any row is scored: a wrong count, a truncated file, a header
    claiming a huge size, a tensor of the wrong dtype, a summary that is not JSON, a missing tensor."""
    from safetensors import safe_open
    from safetensors.numpy import save

    run = tmp_path / "run"
    shutil.copytree(drift_setup["run"], run)
    path = run / "reference_profile.safetensors"
    good = path.read_bytes()
    with safe_open(path, "np") as handle:
        metadata = handle.metadata()
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    summary = json.loads(metadata["reference_profile"])
    summary["score_counts"][6] += 1
    dims = arrays["embeddings_image"].shape[1]
    damaged = {
        "score_counts: counts sum to 129, not the 128 rows": save(arrays, metadata={"reference_profile": json.dumps(summary)}),
        f"{len(good) - 100} bytes, its header declares {len(good)} (a truncated or damaged file)": good[:-100],
        f"its header declares {1 << 40} bytes, more than a reference profile's {(2 << 20) + (64 << 10)}":
            (1 << 40).to_bytes(8, "little") + good[8:],
        f"tensor embeddings_image: expected float16 of shape (128, {dims}), got float32 of shape (128, {dims})":
            save({**arrays, "embeddings_image": arrays["embeddings_image"].astype(np.float32)}, metadata=metadata),
        "__metadata__.reference_profile: not valid JSON (Expecting value: line 1 column 1 (char 0))":
            save(arrays, metadata={"reference_profile": "profile"}),
        "tensor embeddings_text: missing": save({k: v for k, v in arrays.items() if k != "embeddings_text"}, metadata=metadata),
    }
    for message, data in damaged.items():
        path.write_bytes(data)
        with pytest.raises(RunError) as error:
            drift(run, drift_setup["fresh"], progress=False, echo=lambda line: None)
        assert str(error.value) == f"{path}: {message}"
    path.unlink()
    with pytest.raises(RunError, match=rf"^{path}: no reference profile here; mmcore run writes one when it ends"
                                       " and mmcore export copies it into the bundle$"):
        drift(run, drift_setup["fresh"], progress=False, echo=lambda line: None)
    assert not (run / "drift").exists()


def _relist(bundle, change=None):
    """Rewrite the bundle's manifest listing every file as it is now, then ``change`` its files table."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = file_entries(bundle)
    if change:
        change(manifest["files"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return manifest["files"]


def test_a_bundle_whose_profile_is_unlisted_or_changed_is_refused_like_any_bundle_file(drift_setup, tmp_path):
    quiet = lambda line: None  # noqa: E731
    bundle = tmp_path / "bundle"
    shutil.copytree(drift_setup["bundle"], bundle)
    path = bundle / "reference_profile.safetensors"
    listed = path.stat().st_size
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(RunError) as error:
        drift(bundle, drift_setup["fresh"], progress=False, echo=quiet)
    assert str(error.value) == (f"{bundle}: reference_profile.safetensors: {listed + 1} bytes, manifest.json says {listed}"
                                " (the file was changed after export)")
    _relist(bundle, lambda files: files.pop("reference_profile.safetensors"))
    with pytest.raises(RunError) as error:
        drift(bundle, drift_setup["fresh"], progress=False, echo=quiet)
    assert str(error.value) == (f"{path}: not listed in the bundle's manifest.json; export the run again"
                                " (mmcore export copies its reference profile)")
    assert not (bundle / "drift").exists()


def test_an_older_bundle_with_the_profile_folder_still_drifts(drift_setup, tmp_path):
    """A bundle exported before the one file: ``reference_profile/`` with its four files, each listed."""
    bundle = tmp_path / "older"
    shutil.copytree(drift_setup["bundle"], bundle)
    profile = read_profile(bundle / "reference_profile.safetensors")
    (bundle / "reference_profile.safetensors").unlink()
    write_profile_folder(bundle / "reference_profile", profile)
    files = _relist(bundle)
    assert sorted(name for name in files if name.startswith("reference_profile")) == [
        "reference_profile/embeddings_image.npy", "reference_profile/embeddings_text.npy",
        "reference_profile/profile.json", "reference_profile/scores.npy"]
    older = reference_profile(bundle)
    assert (older.rows, older.score_counts, older.slices) == (profile.rows, profile.score_counts, profile.slices)
    assert np.array_equal(older.sample_scores, profile.sample_scores)
    report = drift(bundle, drift_setup["shifted"], out=tmp_path / "d", progress=False, echo=lambda line: None)
    assert report.exit_code == DRIFT_EXIT_CODE and report.reference_rows == 128
    assert report.score["reference_counts"] == list(profile.score_counts)
    # one of the folder's arrays not listed: refused as the file would be
    _relist(bundle, lambda files: files.pop("reference_profile/embeddings_text.npy"))
    with pytest.raises(RunError) as error:
        reference_profile(bundle)
    assert str(error.value) == (f"{bundle}/reference_profile/embeddings_text.npy: not listed in the bundle's manifest.json;"
                                " export the run again (mmcore export copies its reference profile)")


def test_export_writes_an_older_runs_profile_folder_as_the_one_file(drift_setup, tmp_path):
    from mmcore.export.bundle import copy_reference_profile

    current = drift_setup["run"] / "reference_profile.safetensors"
    run = tmp_path / "run"
    write_profile_folder(run / "reference_profile", read_profile(current))
    folder = tmp_path / "bundle"
    folder.mkdir()
    written = copy_reference_profile(run, folder)
    assert [p.name for p in folder.iterdir()] == ["reference_profile.safetensors"] == [written.name]
    assert written.read_bytes() == current.read_bytes()  # the same profile, the same bytes, whichever layout it came from
    (tmp_path / "bare").mkdir()
    assert copy_reference_profile(tmp_path / "bare", tmp_path / "bare") is None  # a run without one: exported without it
    assert list((tmp_path / "bare").iterdir()) == []


def test_campaigns_split_between_the_sides_are_not_drift():
    """Ads come in campaigns of near copies; a reference and a new set of one distribution, split by
    campaign, look drifted to a classifier that learns each campaign from its own copies, not when the
    folds keep a campaign together."""
    from mmcore.quality.drift import domain_auroc, near_duplicate_clusters

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(60, 32)) * 3
    rows = np.repeat(centers, 10, axis=0) + rng.normal(size=(600, 32)) * 0.3
    campaign = np.repeat(np.arange(60), 10)
    reference, new = rows[campaign % 2 == 0], rows[campaign % 2 == 1]
    assert domain_auroc(reference, new) > 0.8
    clusters = near_duplicate_clusters(np.concatenate([reference, new]))
    assert len(set(clusters.tolist())) == 60
    assert abs(domain_auroc(reference, new, groups=clusters) - 0.5) < 0.1
    # every new row one campaign: grouped folds would train on one side only, so the folds are not grouped
    one = centers[:1] + rng.normal(size=(300, 32)) * 0.01
    clusters = near_duplicate_clusters(np.concatenate([reference, one]))
    assert domain_auroc(reference, one, groups=clusters) > 0.95
