"""Drift: the domain classifier's AUROC, PSI and the score histogram on the server's buckets, the
reference profile on disk (round trip, a damaged one in one line), and the verdict with its exit code."""

import json

import numpy as np
import pytest

from mmcore.errors import RunError
from mmcore.evaluation.metrics import SCORE_BUCKETS
from mmcore.quality import (
    DRIFT_EXIT_CODE,
    DriftRule,
    build_profile,
    compare_to_profile,
    domain_auroc,
    psi,
    read_profile,
    score_histogram,
    write_profile,
)
from mmcore.quality.drift import psi_band, psi_from_counts

pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install 'mmcore[quality]')")

TEXTS = ["50% OFF today", "", "buy now and save big on all our shoes", "", ""]


def sample(seed, n, *, shifted=False):
    """Calibrated scores, OCR texts and {image, text} embeddings of n rows; ``shifted`` moves all three."""
    rng = np.random.default_rng(seed)
    scores = rng.beta(5, 2, n) if shifted else rng.beta(2, 5, n)
    texts = [TEXTS[i] for i in rng.integers(0, 2 if shifted else 5, n)]
    embeddings = {"image": rng.normal(size=(n, 12)) + (1.0 if shifted else 0.0), "text": rng.normal(size=(n, 8))}
    return scores, texts, embeddings


def test_domain_auroc_is_half_on_one_distribution_and_one_on_shifted_ones():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 16))
    assert abs(domain_auroc(reference, rng.normal(size=(300, 16)), seed=0) - 0.5) < 0.08
    assert domain_auroc(reference, rng.normal(size=(300, 16)) + 1.0, seed=0) > 0.99
    same = rng.normal(size=(300, 16)) + 1.0
    assert domain_auroc(reference, same, seed=3) == domain_auroc(reference, same, seed=3)  # seeded
    with pytest.raises(ValueError, match=r"needs at least 5 rows on each side \(got 400 and 4\)"):
        domain_auroc(reference, same[:4])
    with pytest.raises(ValueError, match=r"differ in dims \(16 vs 3\)"):
        domain_auroc(reference, same[:, :3])


def test_psi_by_hand():
    # shares 0.5/0.3/0.2 -> 0.3/0.3/0.4: (0.3-0.5) ln(0.3/0.5) + 0 + (0.4-0.2) ln(0.4/0.2)
    assert psi_from_counts([50, 30, 20], [30, 30, 40]) == pytest.approx(0.2 * np.log(5 / 3) + 0.2 * np.log(2))
    # an empty bucket is floored at 1e-4 of the rows: finite
    assert psi_from_counts([100, 0], [50, 50]) == pytest.approx(-0.5 * np.log(0.5) + (0.5 - 1e-4) * np.log(0.5 / 1e-4))
    # on scores, over SCORE_BUCKETS: 10 rows at 0.03 and 0.35 shifting 2 of 5 into 0.75
    reference = [0.03] * 5 + [0.35] * 5
    new = [0.03] * 5 + [0.35] * 3 + [0.75] * 2
    floor = 1e-4
    expected = (0.3 - 0.5) * np.log(0.3 / 0.5) + (0.2 - floor) * np.log(0.2 / floor)
    assert psi(reference, new) == pytest.approx(expected)
    assert [psi_band(v) for v in (0.05, 0.1, 0.24, 0.25)] == ["stable", "moderate", "moderate", "significant"]


def test_score_histogram_uses_the_le_buckets():
    counts = score_histogram([0.0, 0.01, 0.0100001, 0.5, 0.50001, 0.99, 1.0])
    assert len(counts) == len(SCORE_BUCKETS) == 14
    assert {i: int(c) for i, c in enumerate(counts) if c} == {0: 2, 1: 1, 6: 1, 7: 1, 12: 1, 13: 1}


def test_the_serve_histogram_equals_drifts_counts():
    prometheus = pytest.importorskip("prometheus_client")
    registry = prometheus.CollectorRegistry()
    histogram = prometheus.Histogram("score", "calibrated score", registry=registry, buckets=SCORE_BUCKETS)
    scores = np.random.default_rng(0).uniform(size=500).round(2)  # many values right on an edge
    for score in scores:
        histogram.observe(float(score))
    cumulative = [registry.get_sample_value("score_bucket", {"le": str(float(edge))}) for edge in SCORE_BUCKETS]
    assert np.diff([0.0, *cumulative]).tolist() == score_histogram(scores).tolist()


def test_profile_round_trip(tmp_path):
    from safetensors import safe_open

    scores, texts, embeddings = sample(0, 120)
    sizes = [(800, 600)] * 60 + [(200, 400)] * 60
    profile = build_profile(scores, 0.4, texts, embeddings, image_sizes=sizes, sample_rows=50, seed=3)
    path = write_profile(tmp_path / "reference_profile.safetensors", profile)
    assert [p.name for p in tmp_path.iterdir()] == ["reference_profile.safetensors"]  # one file, no temporary left
    with safe_open(path, "np") as handle:  # a plain safetensors file: the summary in its metadata, the arrays as tensors
        assert sorted(handle.keys()) == ["embeddings_image", "embeddings_text", "scores"]
        assert json.loads(handle.metadata()["reference_profile"])["rows"] == 120
    back = read_profile(path)
    assert (back.rows, back.threshold, back.sample_seed) == (120, 0.4, 3)
    assert back.score_counts == tuple(score_histogram(scores).tolist()) and sum(back.score_counts) == 120
    assert back.positives == int(np.sum(scores >= 0.4))
    assert back.empty_ocr == texts.count("")
    assert back.slices == json.loads(json.dumps(profile.slices))
    assert sorted(back.slices) == ["aspect_ratio", "image_size", "ocr_length", "text"]
    assert back.slices["aspect_ratio"]["tall (w/h < 0.75)"]["rows"] == 60
    assert back.sample_scores.dtype == np.float32 and back.sample_scores.shape == (50,)
    assert back.embeddings["image"].dtype == np.float16 and back.embeddings["image"].shape == (50, 12)
    # the sample is one seeded set of rows: its scores and embeddings belong together
    picked = np.sort(np.random.default_rng(3).choice(120, size=50, replace=False))
    assert np.array_equal(back.sample_scores, scores[picked].astype(np.float32))
    assert np.array_equal(back.embeddings["text"], embeddings["text"][picked].astype(np.float16))


def test_an_older_profile_folder_reads_as_the_one_file_does(tmp_path):
    from older_profile import write_profile_folder

    from mmcore.quality.profile import profile_path

    scores, texts, embeddings = sample(0, 90)
    profile = build_profile(scores, 0.4, texts, embeddings, sample_rows=40, seed=1)
    older = write_profile_folder(tmp_path / "old" / "reference_profile", profile)
    assert profile_path(tmp_path / "old") == older  # a run or bundle written before the one file
    from_folder, from_file = read_profile(older), read_profile(write_profile(tmp_path / "p.safetensors", profile))
    for field in ("rows", "threshold", "score_counts", "positives", "empty_ocr", "slices", "sample_seed"):
        assert getattr(from_folder, field) == getattr(from_file, field), field
    assert np.array_equal(from_folder.sample_scores, from_file.sample_scores)
    assert all(np.array_equal(from_folder.embeddings[m], from_file.embeddings[m]) for m in ("image", "text"))
    write_profile(tmp_path / "old" / "reference_profile.safetensors", profile)
    assert profile_path(tmp_path / "old") == tmp_path / "old" / "reference_profile.safetensors"  # the file first


@pytest.fixture
def profile_file(tmp_path):
    scores, texts, embeddings = sample(0, 60)
    return write_profile(tmp_path / "reference_profile.safetensors",
                         build_profile(scores, 0.4, texts, embeddings, sample_rows=20))


@pytest.fixture
def profile_dir(tmp_path):
    """The same profile in an older run's ``reference_profile/`` folder."""
    from older_profile import write_profile_folder

    scores, texts, embeddings = sample(0, 60)
    return write_profile_folder(tmp_path / "reference_profile", build_profile(scores, 0.4, texts, embeddings, sample_rows=20))


def one_line(path):
    with pytest.raises(RunError) as error:
        read_profile(path)
    assert "\n" not in str(error.value) and error.value.exit_code == 4
    return str(error.value)


def rewrite_summary(path, damage):
    """Rewrite the profile file at ``path`` with ``damage`` applied to its summary (the arrays kept)."""
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(path, "np") as handle:
        summary = json.loads(handle.metadata()["reference_profile"])
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    damage(summary)
    path.write_bytes(save(arrays, metadata={"reference_profile": json.dumps(summary)}))


def bump(key):
    return lambda d: d[key].__setitem__(0, d[key][0] + 1)


@pytest.mark.parametrize(("damage", "message"), [
    (bump("score_counts"), "score_counts: counts sum to 61, not the 60 rows"),
    (lambda d: d["slices"]["text"]["text empty"].update(positives=-2),
     "slices.text.text empty.positives: must be a whole number from 0 up to 34 (got -2)"),
    (lambda d: d["sample"]["modalities"].update({"../../etc": 8}),
     "sample.modalities: modality name '../../etc' must match [a-z][a-z0-9_]{0,31}"),
    (lambda d: d["sample"]["modalities"].update({f"m{i}": 8 for i in range(8)}),
     "sample.modalities: must map up to 8 modality names to their dimensions"),
    (lambda d: d.update(version=2), "version: version 2 is not the 1 this mmcore reads"),
    (lambda d: d.update(score_buckets=[0.5, 1.0]),
     "score_buckets: written with other bucket edges than this mmcore's SCORE_BUCKETS; export the run again"),
    (lambda d: d.pop("threshold"), "threshold: missing"),
])
def test_a_damaged_summary_is_one_line_naming_the_file_and_field(profile_file, profile_dir, damage, message):
    summary = json.loads(json.dumps(read_profile(profile_file).slices))
    assert summary["text"]["text empty"]["rows"] == 34  # the message below names it
    rewrite_summary(profile_file, damage)
    assert one_line(profile_file) == f"{profile_file}: {message}"
    path = profile_dir / "profile.json"  # the older folder's profile.json: the same checks
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    assert one_line(profile_dir) == f"{path}: {message}"


def test_a_damaged_profile_file_is_one_line_before_its_arrays_are_read(profile_file, monkeypatch):
    """Every size is checked against the header and the summary before the arrays are read:
    the truncated, the oversized, the mistyped and the incomplete are refused in one line each."""
    import safetensors.numpy
    from safetensors import safe_open
    from safetensors.numpy import save

    good = profile_file.read_bytes()
    loads, load = [], safetensors.numpy.load
    monkeypatch.setattr(safetensors.numpy, "load", lambda data: loads.append(len(data)) or load(data))
    with safe_open(profile_file, "np") as handle:
        metadata = handle.metadata()
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}

    def refusal(data):
        profile_file.write_bytes(data)
        return one_line(profile_file).removeprefix(f"{profile_file}: ")

    assert refusal(good[:-10]) == f"{len(good) - 10} bytes, its header declares {len(good)} (a truncated or damaged file)"
    assert refusal(good + b"\0" * 4) == f"{len(good) + 4} bytes, its header declares {len(good)} (a truncated or damaged file)"
    assert refusal(good[:5]) == "5 bytes, too short for a safetensors file"
    assert refusal((1 << 40).to_bytes(8, "little") + good[8:]) == (
        f"its header declares {1 << 40} bytes, more than a reference profile's {2 * (1 << 20) + (64 << 10)}")
    assert refusal((len(good)).to_bytes(8, "little") + good[8:]) == (
        f"{len(good)} bytes, shorter than its {len(good)}-byte header (a truncated file)")
    assert refusal(good[:8] + b"[" + good[9:]).startswith("its safetensors header: not valid JSON (")
    assert refusal(save({**arrays, "scores": arrays["scores"].astype(np.float64)}, metadata=metadata)) == (
        "tensor scores: expected float32 of shape (20,), got float64 of shape (20,)")
    assert refusal(save({**arrays, "embeddings_image": arrays["embeddings_image"][:, :11]}, metadata=metadata)) == (
        "tensor embeddings_image: expected float16 of shape (20, 12), got float16 of shape (20, 11)")
    assert refusal(save({"scores": arrays["scores"], "embeddings_text": arrays["embeddings_text"]}, metadata=metadata)) == (
        "tensor embeddings_image: missing")
    assert refusal(save({**arrays, "extra": arrays["scores"]}, metadata=metadata)) == (
        "tensor extra: not part of a reference profile")
    assert refusal(save(arrays, metadata={"reference_profile": "{not json"})).startswith(
        "__metadata__.reference_profile: not valid JSON (Expecting property name")
    assert refusal(save(arrays)) == "__metadata__: missing"
    assert refusal(save(arrays, metadata={"reference_profile": " " * (1 << 20) + "{}"})) == (
        f"__metadata__.reference_profile: {(1 << 20) + 2} characters, more than a summary's {1 << 20}")
    assert loads == []  # none of them read an array: only a file whose sizes all agree reaches the loader
    assert refusal(save({**arrays, "scores": np.full(20, 1.5, dtype=np.float32)}, metadata=metadata)) == (
        "tensor scores: holds values that are not finite scores in [0, 1]")
    assert loads == [len(good)]


def test_a_missing_or_unreadable_profile_is_one_line(profile_file, profile_dir):
    missing = profile_file.with_name("other.safetensors")
    assert one_line(missing) == (f"{missing}: no reference profile here; mmcore run writes one when it ends and mmcore"
                                 " export copies it into the bundle")
    folder_named_as_file = profile_file.with_name("x.safetensors")
    folder_named_as_file.mkdir()
    assert one_line(folder_named_as_file) == f"{folder_named_as_file}: reference profile: is a directory; name a regular file"
    path = profile_dir / "profile.json"  # the older folder's
    path.write_text("{not json")
    assert one_line(profile_dir).startswith(f"{path}: not valid JSON (Expecting property name")
    path.write_bytes(b" " * (1 << 20) + b"{}")
    assert one_line(profile_dir) == f"{path}: {(1 << 20) + 2} bytes, more than a reference profile's {1 << 20}"
    path.unlink()
    assert one_line(profile_dir) == (f"{path}: no reference profile here; mmcore run writes one when it ends and mmcore"
                                     " export copies it into the bundle")


def test_a_damaged_array_of_an_older_folder_is_one_line_and_never_unpickled(profile_dir):
    json_path = profile_dir / "profile.json"
    kept = json_path.read_text()
    npy = profile_dir / "embeddings_image.npy"
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # an object array needs pickle to load
    with pytest.raises(RunError, match=r"embeddings_image.npy: not a numeric .npy array \(Object arrays cannot be loaded"):
        read_profile(profile_dir)
    np.save(npy, np.zeros((20, 11), dtype=np.float16))
    with pytest.raises(RunError) as error:
        read_profile(profile_dir)
    assert str(error.value) == f"{npy}: expected float16 of shape (20, 12), got float16 of shape (20, 11)"
    np.save(npy, np.zeros((20, 12), dtype=np.float16))
    np.save(profile_dir / "scores.npy", np.full(20, 1.5, dtype=np.float32))
    with pytest.raises(RunError, match=r"scores.npy: holds values that are not finite scores in \[0, 1\]$"):
        read_profile(profile_dir)
    assert json_path.read_text() == kept


def test_a_resample_is_stable_and_a_shifted_set_drifts(tmp_path):
    scores, texts, embeddings = sample(0, 600)
    profile = read_profile(write_profile(tmp_path / "p.safetensors", build_profile(scores, 0.4, texts, embeddings, sample_rows=400)))

    same = compare_to_profile(profile, **dict(zip(("scores", "texts", "embeddings"), sample(1, 500))))
    assert not same.drift and same.exit_code == 0 and same.reasons == ()
    assert set(same.domain_auroc) == {"image", "text"} and same.domain_auroc["image"]["rows_per_side"] == 400
    assert all(abs(v["auroc"] - 0.5) < 0.1 for v in same.domain_auroc.values())
    assert same.score["psi"] < 0.1 and same.score["psi_band"] == "stable"

    new_scores, new_texts, new_embeddings = sample(2, 500, shifted=True)
    moved = compare_to_profile(profile, scores=new_scores, texts=new_texts, embeddings=new_embeddings)
    assert moved.drift and moved.exit_code == DRIFT_EXIT_CODE == 10
    assert moved.domain_auroc["image"]["auroc"] > 0.95 and moved.domain_auroc["text"]["auroc"] < 0.6
    assert moved.reasons == (f"image domain AUROC {moved.domain_auroc['image']['auroc']:.3f} >= 0.75",
                             f"score PSI {moved.score['psi']:.3f} >= 0.25")
    assert moved.positive_rate["shift"] == pytest.approx(np.mean(new_scores >= 0.4) - np.mean(scores >= 0.4), abs=1e-6)
    assert moved.empty_ocr_rate == {"reference": round(texts.count("") / 600, 6),
                                    "new": round(new_texts.count("") / 500, 6),
                                    "shift": round(new_texts.count("") / 500 - texts.count("") / 600, 6)}
    text_slices = {row["slice"]: row for row in moved.slices["text"]}
    assert text_slices["text empty"]["new_rows"] == new_texts.count("")
    assert text_slices["text empty"]["psi"] > 0.25
    # only the score rule: the same shifted set passes with a lenient PSI limit and no image embeddings
    lenient = compare_to_profile(profile, scores=new_scores, texts=new_texts, embeddings={"text": new_embeddings["text"]},
                                 rule=DriftRule(domain_auroc=0.75, psi=100.0))
    assert not lenient.drift and lenient.notes == ("no new image embeddings: its domain AUROC is not computed",)

    written = json.loads(moved.write(tmp_path / "drift.json").read_text())
    assert written["drift"] is True and written["exit_code"] == 10 and written["rule"] == {"domain_auroc": 0.75, "psi": 0.25}
    assert written["score"]["buckets"] == list(SCORE_BUCKETS) and sum(written["score"]["new_counts"]) == 500
