"""`mmcore export`: a self-contained bundle that scores as the run does, or no bundle at all."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mmcore.export.bundle import MANIFEST, sha256_file


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_good_export_passes_parity_with_its_figures(exported_bundle, exportable_run):
    """parity.json holds the figures; the manifest hashes every file; weights are the run's, without pickle."""
    import onnxruntime as ort
    import torch
    from safetensors.torch import load_file

    parity = json.loads((exported_bundle / "parity.json").read_text())
    assert parity["passed"] is True
    assert parity["rows_compared"] == 32  # the run's whole validation split
    assert parity["data"].endswith("val.csv")
    assert parity["max_abs_score_diff"] <= 1e-4 and parity["max_abs_calibrated_score_diff"] <= 1e-4
    assert parity["decision_agreement"] == 1.0
    assert 0 <= parity["max_abs_logit_diff"] < 1e-3
    assert parity["tolerance"] == {"score": 1e-4, "agreement": 1.0}

    manifest = json.loads((exported_bundle / MANIFEST).read_text())
    files = {p.relative_to(exported_bundle).as_posix() for p in exported_bundle.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == files
    assert {"model.safetensors", "model.onnx", "recipe.toml", "decision.json", "preprocessing.json",
            "text.json", "parity.json", "tokenizer/tokenizer_config.json"} <= files
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(exported_bundle / rel)
    assert {"mmcore", "torch", "onnx", "onnxruntime", "transformers"} <= set(manifest["versions"])
    assert manifest["graph"]["inputs"] == ["pixel_values", "input_ids", "token_type_ids", "attention_mask"]

    ckpt = torch.load(exportable_run / "checkpoint_best.ckpt", weights_only=True)
    weights = load_file(str(exported_bundle / "model.safetensors"))
    assert set(weights) == set(ckpt["model"])
    for key, value in ckpt["model"].items():
        assert torch.equal(weights[key], value.cpu()), key
    decision = json.loads((exported_bundle / "decision.json").read_text())
    assert decision["threshold"] == ckpt["decision"]["threshold"]
    assert decision["temperature"] == ckpt["decision"]["temperature"]

    # one graph, a dynamic batch axis and a dynamic token axis: 3 rows of 7 tokens -> 3 logits
    session = ort.InferenceSession(str(exported_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": np.zeros((3, 3, 32, 32), np.float32), "input_ids": np.full((3, 7), 101, np.int64),
             "token_type_ids": np.zeros((3, 7), np.int64), "attention_mask": np.ones((3, 7), np.int64)}
    assert session.run(["logit"], feeds)[0].shape == (3,)


def test_a_perturbed_bundle_is_refused_with_one_line(exportable_run, tmp_path, monkeypatch):
    """Weights changed on the way into the graph: the gate refuses, names the worst row, leaves nothing."""
    import torch

    import mmcore.commands.export as export_command
    from mmcore.export.parity import ParityError

    real = export_command.write_graph

    def perturbed(fused, example, path, fmt):
        with torch.no_grad():
            for parameter in fused.classifier.head.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        real(fused, example, path, fmt)

    monkeypatch.setattr(export_command, "write_graph", perturbed)
    out = tmp_path / "bundles" / "perturbed"
    with pytest.raises(ParityError) as failure:
        export_command.export_run(exportable_run, out, progress=False, echo=lambda line: None)
    line = str(failure.value)
    assert "\n" not in line
    match = re.fullmatch(
        rf"{re.escape(str(out))}: parity gate failed on 32 rows: .*; worst: \S*val\.csv row (\d+) "
        r"\((images/\S+)\): PyTorch (\d\.\d{6}), bundle (\d\.\d{6}); no bundle written", line)
    assert match, line
    assert float(match.group(3)) != float(match.group(4))
    assert not out.exists()
    assert list((tmp_path / "bundles").iterdir()) == []  # no partial folder either


def test_predict_on_a_bundle_gives_the_runs_scores(exported_bundle, exportable_run, demo_data, tmp_path, cli):
    """`mmcore predict BUNDLE_DIR` (onnxruntime): the run's columns and its test scores within the tolerance."""
    out = tmp_path / "scored.csv"
    result = cli("predict", exported_bundle, Path(demo_data) / "test.csv", "-o", out, "--quiet")
    assert f"scored 32 of 32 rows of {Path(demo_data) / 'test.csv'} with bundle {exported_bundle}" in result.stdout
    expected = {p["path"]: p for p in json.loads((exportable_run / "test_predictions.json").read_text())}
    rows = _rows(out)
    assert list(rows[0]) == ["local_image_path", "label", "text_info", "score", "calibrated_score", "prediction"]
    assert len(rows) == 32
    for row in rows:
        want = expected[row["local_image_path"]]
        assert float(row["score"]) == pytest.approx(want["score"], abs=1e-4)
        assert float(row["calibrated_score"]) == pytest.approx(want["calibrated_score"], abs=1e-4)
        assert row["prediction"] == str(want["prediction"])


def test_a_changed_bundle_file_is_refused(exported_bundle, demo_data, tmp_path, cli):
    """A file edited after export no longer matches its sha256: one line, nothing scored."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(exported_bundle, copy)
    decision = json.loads((copy / "decision.json").read_text())
    decision["threshold"] = 0.01
    (copy / "decision.json").write_text(json.dumps(decision))
    out = tmp_path / "never.csv"
    result = cli("predict", copy, Path(demo_data) / "test.csv", "-o", out, check=False)
    assert result.returncode == 4
    assert result.stderr.strip() == (
        f"{copy}: decision.json: sha256 differs from manifest.json (the file was changed after export)")
    assert not out.exists()


def test_an_existing_out_folder_is_not_overwritten(exportable_run, exported_bundle, cli):
    result = cli("export", exportable_run, "--out", exported_bundle, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"--out {exported_bundle}: already exists; remove it or choose another folder"


def test_a_text_encoder_without_a_tokenizer_names_itself(registry):
    """fake_text hashes strings in Python: no tokenizer to keep outside the graph -> one line naming it."""
    from mmcore.export.onnx import ExportUnsupported, text_tokenizer

    encoder = registry.get("text", "fake_text").factory(registry.get("text", "fake_text").params_cls())
    with pytest.raises(ExportUnsupported) as failure:
        text_tokenizer(encoder)
    assert str(failure.value).startswith("text encoder 'fake_text' (FakeText): cannot be exported: ")


def test_agreement_ignores_rows_on_the_threshold_but_not_real_flips():
    """The tuned threshold is a validation score: a row on it flips on float noise; a row far from it must not."""
    import numpy as np

    from mmcore.data.csvs import Split
    from mmcore.export.parity import compare
    from mmcore.export.scoring import Scorer

    class Stub(Scorer):
        recipe_data = {"train": {"modality": "text_only"}}
        decision = {"threshold": 0.5, "temperature": 1.0}

        def __init__(self, logits):
            self.values = np.asarray(logits)

        def logits(self, vision_items, texts):
            return self.values

    split = Split(csv=Path("val.csv"), paths=(Path("a"), Path("b")), texts=("x", "y"), labels=None, rows=(2, 3),
                  raw_paths=("a.jpg", "b.jpg"))
    on_threshold = compare(Stub([-1e-7, 2.0]), split, np.array([0.0, 2.0]), score_tol=1e-4, min_agreement=1.0)
    assert on_threshold.passed and on_threshold.borderline == 1 and on_threshold.agreement == 1.0
    far_flip = compare(Stub([0.0, -2.0]), split, np.array([0.0, 2.0]), score_tol=0.3, min_agreement=1.0)
    assert not far_flip.passed and far_flip.worst_row == 3
    assert "decision agreement 0.0000 < 1; worst: val.csv row 3 (b.jpg)" in far_flip.failure_line("out")


def test_a_single_tokenizer_bundle_keeps_the_format_1_layout(exported_bundle):
    """One text encoder with a tokenizer: bundle format 1, text.json's four keys, tokenizer/ — what older mmcore reads."""
    manifest = json.loads((exported_bundle / MANIFEST).read_text())
    assert manifest["bundle_format"] == 1
    text = json.loads((exported_bundle / "text.json").read_text())
    assert set(text) == {"name", "prefix", "max_length", "inputs"}
    assert text["inputs"] == manifest["graph"]["text_inputs"] == ["input_ids", "token_type_ids", "attention_mask"]
    assert (exported_bundle / "tokenizer" / "tokenizer_config.json").is_file()
    assert not (exported_bundle / "tokenizers").exists()


def test_a_featurizer_that_is_not_installed_is_one_line(tmp_path):
    """A bundle's host featurizer is rebuilt from module + class + fields: a missing plugin says so, naming the file."""
    from mmcore.errors import RunError
    from mmcore.export.text import HostText

    (tmp_path / "text.json").write_text(json.dumps({"name": "ngrams", "inputs": ["word_tf"], "featurizer": {
        "module": "mmcore_text_gone", "class": "NgramFeaturizer", "fields": {}}}))
    with pytest.raises(RunError) as failure:
        HostText(tmp_path)
    line = str(failure.value)
    assert line.startswith(f"{tmp_path / 'text.json'}: featurizer: text featurizer class mmcore_text_gone.NgramFeaturizer "
                           "is not importable (")
    assert line.endswith("; install the plugin that made this bundle") and "\n" not in line
