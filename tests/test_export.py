"""`mmcore export`: a self-contained bundle that scores as the run does, or no bundle at all; a bundle is
data (nothing it names is imported), every file checked against its schema, its weights stored once."""

import csv
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from mmcore.errors import MmcoreError
from mmcore.export.bundle import MANIFEST, sha256_file
from mmcore.export.schema import BundleError

QUIET = {"progress": False, "echo": lambda line: None}


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _copy(bundle, tmp_path, name="copy"):
    copy = tmp_path / name
    shutil.copytree(bundle, copy)
    return copy


def _manifest(bundle):
    return json.loads((bundle / MANIFEST).read_text())


def _inputs(bundle):
    return json.loads((bundle / "inputs.json").read_text())


def _set_manifest(bundle, manifest):
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _tamper(bundle, rel, content):
    """Write a bundle file and update its manifest entry, as anyone who can write the bundle can."""
    path = bundle / rel
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    manifest = _manifest(bundle)
    manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    _set_manifest(bundle, manifest)


def _refusal(bundle):
    """The one line opening ``bundle`` fails with."""
    from mmcore.scoring.bundle import BundleScorer

    with pytest.raises(MmcoreError) as failure:
        BundleScorer(bundle, device="cpu")
    assert failure.value.exit_code == 4
    return str(failure.value)


def test_a_good_export_passes_parity_with_its_figures(exported_bundle, exportable_run):
    """parity.json holds the figures (float32 on both sides); the manifest lists every file with its sha256;
    the weights are in the graph only (no model.safetensors unless asked); every file has the same mode."""
    import onnxruntime as ort

    parity = json.loads((exported_bundle / "parity.json").read_text())
    assert parity["passed"] is True
    assert parity["rows_compared"] == 32  # the run's whole validation split
    assert parity["data"].endswith("val.csv")
    assert parity["max_abs_score_diff"] <= 1e-4 and parity["max_abs_calibrated_score_diff"] <= 1e-4
    assert parity["decision_agreement"] == 1.0
    assert 0 <= parity["max_abs_logit_diff"] < 1e-3
    assert parity["tolerance"] == {"score": 1e-4, "agreement": 1.0}
    assert parity["torch_precision"] == "fp32" and "trained_precision_deviation" not in parity  # a CPU fp32 run

    manifest = _manifest(exported_bundle)
    files = {p.relative_to(exported_bundle).as_posix() for p in exported_bundle.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == files
    assert files == {"model.onnx", "recipe.toml", "decision.json", "inputs.json", "parity.json", "README.md",
                     "tokenizer/tokenizer.json", "reference_profile.safetensors"}
    assert "model.safetensors" not in files and "model.onnx.data" not in files  # the weights once, inside the graph
    for rel, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(exported_bundle / rel), "bytes": (exported_bundle / rel).stat().st_size}
    assert manifest["bundle_format"] == 5 and "external_data" not in manifest["graph"]
    assert {"mmcore", "torch", "onnx", "onnxruntime", "transformers"} <= set(manifest["versions"])
    assert manifest["graph"]["inputs"] == ["pixel_values", "input_ids", "token_type_ids", "attention_mask"]
    modes = {stat.S_IMODE(p.stat().st_mode) for p in exported_bundle.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~_umask()}  # one mode for all (safetensors and tempfile would write 0600)

    import torch

    ckpt = torch.load(exportable_run / "checkpoint_best.ckpt", weights_only=True)
    decision = json.loads((exported_bundle / "decision.json").read_text())
    assert decision["threshold"] == ckpt["decision"]["threshold"]
    assert decision["temperature"] == ckpt["decision"]["temperature"]
    preprocessing = json.loads((exported_bundle / "inputs.json").read_text())["vision"]
    assert preprocessing["class"] == "mmcore/Preprocessing" and "module" not in preprocessing  # a registry name

    # one graph, a dynamic batch axis and a dynamic token axis: 3 rows of 7 tokens -> 3 logits
    session = ort.InferenceSession(str(exported_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": np.zeros((3, 3, 32, 32), np.float32), "input_ids": np.full((3, 7), 101, np.int64),
             "token_type_ids": np.zeros((3, 7), np.int64), "attention_mask": np.ones((3, 7), np.int64)}
    assert session.run(["logit"], feeds)[0].shape == (3,)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    """A file edited after export no longer matches its size (always checked; its sha256 too, see below): one line."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(exported_bundle, copy)
    decision = json.loads((copy / "decision.json").read_text())
    decision["threshold"] = 0.01
    (copy / "decision.json").write_text(json.dumps(decision))
    out = tmp_path / "never.csv"
    result = cli("predict", copy, Path(demo_data) / "test.csv", "-o", out, check=False)
    listed = _manifest(copy)["files"]["decision.json"]["bytes"]
    assert result.returncode == 4
    assert result.stderr.strip() == (
        f"{copy}: decision.json: {(copy / 'decision.json').stat().st_size} bytes, manifest.json says {listed} "
        "(the file was changed after export)")
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

    from mmcore.data.split import Split
    from mmcore.export.parity import compare
    from mmcore.scoring.base import Scorer

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


def test_a_single_tokenizer_bundle_keeps_the_format_1_text_layout(exported_bundle):
    """One text encoder with a tokenizer: inputs.json's text holds the four keys text.json has had since
    format 1 and, since format 5, how its fast tokenizer pads and truncates; tokenizer/ beside it holds
    tokenizer.json alone."""
    manifest = _manifest(exported_bundle)
    inputs = json.loads((exported_bundle / "inputs.json").read_text())
    assert set(inputs) == {"vision", "text"}
    assert set(inputs["text"]) == {"name", "prefix", "max_length", "inputs", "fast_tokenizer"}
    assert inputs["text"]["fast_tokenizer"] == {"pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]",
                                                "padding_side": "right", "truncation_side": "right"}
    assert inputs["text"]["inputs"] == manifest["graph"]["text_inputs"] == ["input_ids", "token_type_ids", "attention_mask"]
    assert [p.name for p in (exported_bundle / "tokenizer").iterdir()] == ["tokenizer.json"]
    assert not (exported_bundle / "tokenizers").exists()


def test_a_featurizer_that_is_not_installed_is_one_line(tmp_path, registry):
    """A featurizer is named by registry name: a component nobody installed says so, naming the file; an older
    bundle's module path is compared with the declared classes, never imported."""
    from mmcore.export.inputs import read_host_inputs

    def refusal(featurizer):
        (tmp_path / "inputs.json").write_text(json.dumps({"text": {"name": "ngrams", "inputs": ["word_tf"],
                                                                   "featurizer": featurizer}}))
        with pytest.raises(MmcoreError) as failure:
            read_host_inputs(tmp_path, registry, bundle_format=4, vision=False, text=True)
        return str(failure.value)

    line = refusal({"class": "text/ngrams_gone/NgramFeaturizer", "fields": {}})
    assert line.startswith(f"{tmp_path / 'inputs.json'}: text: featurizer: class: text featurizer class "
                           "'text/ngrams_gone/NgramFeaturizer': unknown text encoder 'ngrams_gone' installed: ")
    assert "\n" not in line
    assert refusal({"module": "mmcore_text_gone", "class": "NgramFeaturizer", "fields": {}}) == (
        f"{tmp_path / 'inputs.json'}: text: featurizer: text featurizer class mmcore_text_gone.NgramFeaturizer is not a "
        "data class any installed mmcore component declares; a bundle's classes are never imported (install the plugin "
        "that made this bundle, or export the run again)")


def test_inputs_json_must_describe_every_modality_the_model_reads(exported_bundle, tmp_path):
    """A multimodal bundle whose inputs.json lacks the text side, or carries a key of its own: one line each."""
    bundle = _copy(exported_bundle, tmp_path, "no_text")
    inputs = json.loads((bundle / "inputs.json").read_text())
    _tamper(bundle, "inputs.json", json.dumps({"vision": inputs["vision"]}))
    assert _refusal(bundle) == f"{bundle}/inputs.json: text: missing (the model reads text); export the run again"

    bundle = _copy(exported_bundle, tmp_path, "extra_key")
    _tamper(bundle, "inputs.json", json.dumps({**inputs, "module": "os"}))
    assert _refusal(bundle) == f"{bundle}/inputs.json: module: unknown key"


def _as_format_3(bundle):
    """``bundle`` laid out as format 3 wrote it: inputs.json's two halves in preprocessing.json and text.json."""
    inputs = json.loads((bundle / "inputs.json").read_text())
    (bundle / "inputs.json").unlink()
    manifest = _manifest(bundle)
    del manifest["files"]["inputs.json"]
    manifest["bundle_format"] = 3
    _set_manifest(bundle, manifest)
    _tamper(bundle, "preprocessing.json", json.dumps(inputs["vision"]))
    _tamper(bundle, "text.json", json.dumps(inputs["text"]))
    return bundle


def _as_format_4(bundle, tmp_path):
    """``bundle`` as format 4 wrote it: transformers' tokenizer files, no fast_tokenizer in inputs.json."""
    from mmcore.kit.text import offline_tokenizer

    saved = tmp_path / f"{bundle.name}-tokenizer"
    offline_tokenizer().save_pretrained(str(saved))
    for file in saved.iterdir():
        _tamper(bundle, f"tokenizer/{file.name}", file.read_bytes())
    inputs = _inputs(bundle)
    del inputs["text"]["fast_tokenizer"]
    _tamper(bundle, "inputs.json", json.dumps(inputs))
    manifest = _manifest(bundle)
    manifest["bundle_format"] = 4
    _set_manifest(bundle, manifest)
    return bundle


def test_a_format_4_bundle_reads_its_tokenizer_with_transformers_and_scores_alike(exported_bundle, demo_data, tmp_path):
    from mmcore.commands.predict import predict_csv
    from mmcore.export.text import JsonHostTokenizer
    from mmcore.scoring.bundle import BundleScorer

    format4 = _as_format_4(_copy(exported_bundle, tmp_path, "format4"), tmp_path)
    assert (format4 / "tokenizer" / "tokenizer_config.json").is_file()
    assert type(BundleScorer(format4, device="cpu").host_text.parts[0]) is not JsonHostTokenizer
    assert type(BundleScorer(exported_bundle, device="cpu").host_text.parts[0]) is JsonHostTokenizer
    scores = []
    for source in (format4, exported_bundle):
        predict_csv(source, Path(demo_data) / "test.csv", tmp_path / f"{source.name}.csv", **QUIET)
        scores.append([r["calibrated_score"] for r in _rows(tmp_path / f"{source.name}.csv")])
    assert scores[0] == scores[1]


def test_format_3_and_2_bundles_still_open_and_score_alike(exported_bundle, demo_data, tmp_path):
    """Bundles written before inputs.json (format 3: preprocessing.json + text.json) score as the bundle they were;
    a format-2 bundle naming its classes by module path too: the path is compared with the declared classes (never
    imported); a path no component declares is refused (see below)."""
    from mmcore.commands.predict import predict_csv

    format3 = _as_format_3(_copy(exported_bundle, tmp_path, "format3"))
    format2 = _as_format_3(_copy(exported_bundle, tmp_path, "format2"))
    described = json.loads((format2 / "preprocessing.json").read_text())
    _tamper(format2, "preprocessing.json", json.dumps({"module": "mmcore.interfaces", "class": "Preprocessing",
                                                       "fields": described["fields"], "describe": described["describe"]}))
    manifest = _manifest(format2)
    manifest["bundle_format"] = 2
    _set_manifest(format2, manifest)
    scores = []
    for source in (format3, format2, exported_bundle):
        predict_csv(source, Path(demo_data) / "test.csv", tmp_path / f"{source.name}.csv", **QUIET)
        scores.append([r["calibrated_score"] for r in _rows(tmp_path / f"{source.name}.csv")])
    assert scores[0] == scores[1] == scores[2]

    _tamper(format3, "text.json", "{}")  # format 3's own files are still checked against their schema
    assert _refusal(format3) == f"{format3}/text.json: max_length: missing required key (a tokenizer part needs it)"


# --- a bundle is data: nothing it names is imported ---------------------------------------------------------------

TAMPERED = r"""
import json, sys
from mmcore.errors import MmcoreError
from mmcore.scoring.bundle import BundleScorer

from mmcore.plugins.manager import get_registry
# a good bundle first, its digests and graph checked as a bundle new to this machine is: everything loading
# legitimately needs is imported; and the installed plugins, which a bundle naming a plugin's class loads
BundleScorer(sys.argv[1], device="cpu", verify=True)
get_registry()
before = set(sys.modules)
lines = []
for bundle in sys.argv[2:]:
    try:
        BundleScorer(bundle, device="cpu")
        lines.append("LOADED")
    except MmcoreError as exc:
        lines.append(str(exc))
print(json.dumps({"lines": lines, "imported": sorted(set(sys.modules) - before)}))
"""


def test_a_bundle_naming_code_is_refused_and_nothing_it_names_is_imported(exported_bundle, demo_data, tmp_path, cli):
    """inputs.json's preprocessing naming os.system, subprocess.Popen or a module of the attacker's (sha256 updated in the
    manifest): refused in one line; no module is imported at all, the command never runs, the module never loads."""
    import subprocess
    import sys

    marker = tmp_path / "ran"
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "evil_payload.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Boom:\n    pass\n")
    names = {
        "os_system": {"module": "os", "class": "system", "fields": {"command": f"touch {marker}"}},
        "popen": {"module": "subprocess", "class": "Popen", "fields": {"args": ["touch", str(marker)]}},
        "evil_module": {"module": "evil_payload", "class": "Boom", "fields": {}},
        "by_name": {"class": "evil_payload/Boom", "fields": {}},
        "in_a_component": {"class": "vision/fake_cnn/Popen", "fields": {"args": ["touch", str(marker)]}},
    }
    bundles = []
    for name, described in names.items():
        bundle = _copy(exported_bundle, tmp_path, name)
        _tamper(bundle, "inputs.json", json.dumps({**_inputs(bundle), "vision": described}))
        bundles.append(bundle)
    env = {**os.environ, "PYTHONPATH": f"{payload}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", TAMPERED, str(exported_bundle), *map(str, bundles)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    never = ("is not a data class any installed mmcore component declares; a bundle's classes are never imported "
             "(install the plugin that made this bundle, or export the run again)")
    assert report["lines"] == [
        f"{bundles[0]}/inputs.json: vision: preprocessing class os.system {never}",
        f"{bundles[1]}/inputs.json: vision: preprocessing class subprocess.Popen {never}",
        f"{bundles[2]}/inputs.json: vision: preprocessing class evil_payload.Boom {never}",
        f"{bundles[3]}/inputs.json: vision: class: preprocessing class 'evil_payload/Boom' is not a data class name "
        "(mmcore/<Class> or <kind>/<component>/<Class>)",
        f"{bundles[4]}/inputs.json: vision: class: preprocessing class 'vision/fake_cnn/Popen': vision encoder "
        "'fake_cnn' declares no data class 'Popen' (it declares: none)",
    ]
    assert report["imported"] == []  # not evil_payload, not anything else
    assert not marker.exists()

    # the CLI: the same line, exit 4, nothing written
    out = tmp_path / "never.csv"
    result = cli("predict", bundles[0], Path(demo_data) / "test.csv", "-o", out, check=False, env=env)
    assert result.returncode == 4 and result.stderr.strip() == report["lines"][0]
    assert not out.exists() and not marker.exists()


def _graph(bundle, **graph):
    manifest = _manifest(bundle)
    manifest["graph"].update(graph)
    _set_manifest(bundle, manifest)


def test_the_graph_is_the_listed_file_of_its_format_inside_the_bundle(exported_bundle, tmp_path):
    """An unlisted TorchScript file is never loaded (it used to score every row 1.0); a graph outside the folder,
    or a file that is not its format's, is refused in one line."""
    bundle = _copy(exported_bundle, tmp_path, "torchscript")
    (bundle / "model.torchscript.pt").write_bytes(b"PK not listed")
    _graph(bundle, format="torchscript", file="model.torchscript.pt")
    assert _refusal(bundle) == f"{bundle}/manifest.json: graph.file: model.torchscript.pt is not listed in files"

    bundle = _copy(exported_bundle, tmp_path, "outside")
    _graph(bundle, file="../model.onnx")
    assert _refusal(bundle) == (
        f"{bundle}/manifest.json: graph.file: must be a plain relative path inside the bundle (got '../model.onnx')")

    bundle = _copy(exported_bundle, tmp_path, "other_format")
    _graph(bundle, file="model.torchscript.pt")
    assert _refusal(bundle) == (
        f"{bundle}/manifest.json: graph.file: the onnx graph is 'model.onnx' (got 'model.torchscript.pt')")

    bundle = _copy(exported_bundle, tmp_path, "linked")  # a listed file that is a link out of the folder
    (bundle / "recipe.toml").unlink()
    (bundle / "recipe.toml").symlink_to(exported_bundle / "recipe.toml")
    assert _refusal(bundle) == f"{bundle}: recipe.toml: leads outside the bundle folder (a link); a bundle holds its own files"


def test_onnx_external_data_outside_the_listed_file_is_refused_before_onnxruntime(exported_bundle, tmp_path):
    """A graph whose tensor points at /etc/passwd (digest updated): refused before a session reads a byte."""
    import onnx
    from onnx.external_data_helper import set_external_data

    bundle = _copy(exported_bundle, tmp_path, "external")
    model = onnx.load(str(bundle / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    set_external_data(tensor, location="/etc/passwd", offset=0, length=16)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    _tamper(bundle, "model.onnx", model.SerializeToString())
    assert _refusal(bundle) == (f"{bundle}/model.onnx: refers to external data '/etc/passwd'; a bundle's graph may use "
                                "none (the manifest lists no external data)")


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "link.bin"])
def test_onnxruntime_itself_refuses_external_data_outside_the_graphs_folder(exported_bundle, tmp_path, location):
    """Between the checks made with the digests (first opening on a machine, --verify, export), onnxruntime is the
    guard: a graph whose tensor points at an absolute path, up out of its folder or through a link out of it does
    not open (export/runner.py's check_external_data says why this is enough)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    from mmcore.export.runner import GraphRunner

    (tmp_path / "outside.bin").write_bytes(bytes(1 << 22))
    folder = tmp_path / "graph"
    folder.mkdir()
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    model = onnx.load(str(exported_bundle / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(BundleError) as refused:
        GraphRunner(folder / "model.onnx", "onnx", device="cpu")
    assert str(refused.value).startswith(f"{folder}/model.onnx: onnxruntime cannot open it (")
    assert "External data path validation failed" in str(refused.value)


# --- bundle files present but wrong: one line naming the file and the field -------------------------------------


def _decision(bundle, **changes):
    decision = json.loads((bundle / "decision.json").read_text())
    return json.dumps({**decision, **changes})


WRONG = {
    "nan_threshold": (lambda b: _tamper(b, "decision.json", _decision(b, threshold=float("nan"))),
                      "{b}/decision.json: threshold: must be a finite number (got nan)"),
    "zero_temperature": (lambda b: _tamper(b, "decision.json", _decision(b, temperature=0.0)),
                         "{b}/decision.json: temperature: must be > 0 (got 0.0)"),
    "threshold_above_1": (lambda b: _tamper(b, "decision.json", _decision(b, threshold=1.5)),
                          "{b}/decision.json: threshold: must be in [0.0, 1.0] (got 1.5)"),
    "manifest_not_json": (lambda b: (b / MANIFEST).write_text("{not json"),
                          "{b}/manifest.json: the bundle manifest is not JSON (Expecting property name enclosed in "
                          "double quotes: line 1 column 2 (char 1))"),
    "manifest_unknown_key": (lambda b: _set_manifest(b, {**_manifest(b), "graph_file": "x"}),
                             "{b}/manifest.json: graph_file: unknown key (did you mean graph?)"),
    "pickle_graph": (lambda b: _tamper(b, "model.onnx", __import__("pickle").dumps({"weights": [1, 2]})),
                     "{b}/model.onnx: not an ONNX model (Error parsing message with type 'onnx.ModelProto': "
                     "Wire format was corrupt)"),
    "preprocessing_field": (lambda b: _tamper(b, "inputs.json", json.dumps({**_inputs(b), "vision": {
        "class": "mmcore/Preprocessing", "fields": {"size": [32, 32], "resize": "sideways"}}})),
        "{b}/inputs.json: vision: fields.resize: 'resize' must be in ('squash', 'shorter_center_crop', 'letterbox') "
        "(got 'sideways')"),
    "text_max_length": (lambda b: _tamper(b, "inputs.json", json.dumps({**_inputs(b), "text": {
        **_inputs(b)["text"], "max_length": 0}})),
        "{b}/inputs.json: text.max_length: must be >= 1 (got 0)"),
    "recipe_key": (lambda b: _tamper(b, "recipe.toml", (b / "recipe.toml").read_text().replace("[train]", "[train]\nlr = 1")),
                   "{b}/recipe.toml: train.lr: unknown key (did you mean learning_rate?)"),
    "size_changed": (lambda b: (b / "recipe.toml").write_text((b / "recipe.toml").read_text() + "\n"),
                     "{b}: recipe.toml: {n} bytes, manifest.json says {m} (the file was changed after export)"),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_a_bundle_file_present_but_wrong_is_one_line(case, exported_bundle, tmp_path):
    change, expected = WRONG[case]
    bundle = _copy(exported_bundle, tmp_path, case)
    listed = _manifest(exported_bundle)["files"]["recipe.toml"]["bytes"]
    change(bundle)
    assert _refusal(bundle) == expected.format(b=bundle, n=listed + 1, m=listed)


def test_a_missing_recipe_and_a_broken_manifest_are_not_called_run_directories(exported_bundle, demo_data, tmp_path, cli):
    bundle = _copy(exported_bundle, tmp_path, "no_recipe")
    (bundle / "recipe.toml").unlink()
    manifest = _manifest(bundle)
    del manifest["files"]["recipe.toml"]
    _set_manifest(bundle, manifest)
    assert _refusal(bundle) == f"{bundle}/recipe.toml: missing (the run's recipe); export the run again"

    broken = _copy(exported_bundle, tmp_path, "broken")
    (broken / MANIFEST).write_text("[]")
    result = cli("predict", broken, Path(demo_data) / "test.csv", "-o", tmp_path / "x.csv", check=False)
    assert result.returncode == 4
    assert result.stderr.strip() == f"{broken}/manifest.json: the bundle manifest must be a JSON object (got list)"


# --- digests once per bundle and machine; sizes always ------------------------------------------------------------


def test_digests_are_checked_once_per_bundle_and_machine_unless_asked(exported_bundle, tmp_path, monkeypatch):
    import mmcore.export.bundle as bundle_module
    from mmcore.scoring.bundle import BundleScorer

    monkeypatch.setenv("MMCORE_CACHE_DIR", str(tmp_path / "cache"))
    bundle = _copy(exported_bundle, tmp_path, "moved")  # a new path: this machine never verified it
    hashed = []
    real = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    files = len(_manifest(bundle)["files"])

    BundleScorer(bundle, device="cpu")
    assert len(hashed) == files
    assert len(list((tmp_path / "cache" / "verified-bundles").iterdir())) == 1
    BundleScorer(bundle, device="cpu")  # a second start (another serve worker): sizes only
    assert len(hashed) == files
    BundleScorer(bundle, device="cpu", verify=True)  # --verify
    assert len(hashed) == 2 * files

    decision = bundle / "decision.json"  # a file rewritten in place, same size: its mtime changes, so it is hashed again
    decision.write_text(decision.read_text().replace('"rule": "f1"', '"rule": "F1"'))
    assert _refusal(bundle) == f"{bundle}: decision.json: sha256 differs from manifest.json (the file was changed after export)"


def test_export_records_its_bundle_as_verified(exportable_run, tmp_path, monkeypatch):
    """The exporter hashed every file once; serving the bundle it wrote on the same machine hashes none."""
    import mmcore.export.bundle as bundle_module
    from mmcore.commands.export import export_run
    from mmcore.scoring.bundle import BundleScorer

    monkeypatch.setenv("MMCORE_CACHE_DIR", str(tmp_path / "cache"))
    hashed = []
    real = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    out = tmp_path / "bundle"
    export_run(exportable_run, out, **QUIET)
    assert sorted(hashed) == sorted(Path(rel).name for rel in _manifest(out)["files"])  # each file once
    hashed.clear()
    scorer = BundleScorer(out, device="cpu")
    assert hashed == []
    assert scorer.metadata()["device"] == "cpu" and scorer.metadata()["providers"] == ["CPUExecutionProvider"]


# --- the layout: one external data file past the protobuf limit ---------------------------------------------------


def test_a_graph_over_the_protobuf_limit_keeps_its_weights_in_one_listed_file(exportable_run, exported_bundle, demo_data,
                                                                                 tmp_path, monkeypatch):
    """The limit lowered to 1 KiB: model.onnx + exactly one model.onnx.data, listed, scoring exactly as the inline graph."""
    import mmcore.export.onnx as graph_module
    from mmcore.commands.export import export_run
    from mmcore.commands.predict import predict_csv

    monkeypatch.setattr(graph_module, "EXTERNAL_DATA_THRESHOLD", 1024)
    out = tmp_path / "spilled"
    export_run(exportable_run, out, **QUIET)
    manifest = _manifest(out)
    assert manifest["graph"]["external_data"] == "model.onnx.data"
    on_disk = sorted(p.name for p in out.iterdir() if p.is_file())
    assert [name for name in on_disk if name.startswith("model.")] == ["model.onnx", "model.onnx.data"]
    assert set(manifest["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert (out / "model.onnx.data").stat().st_size > 4 * (out / "model.onnx").stat().st_size  # the weights left the graph

    scores = {}
    for bundle in (out, exported_bundle):
        predict_csv(bundle, Path(demo_data) / "test.csv", tmp_path / f"{bundle.name}.csv", **QUIET)
        scores[bundle.name] = [float(r["calibrated_score"]) for r in _rows(tmp_path / f"{bundle.name}.csv")]
    assert scores["spilled"] == scores[exported_bundle.name]


def test_export_refuses_a_full_disk_naming_it_and_the_space_needed(exportable_run, tmp_path, monkeypatch):
    import errno
    from collections import namedtuple

    import mmcore.commands.export as export_command
    from mmcore.errors import RunError

    mount = tmp_path.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(export_command.shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    out = tmp_path / "full"
    with pytest.raises(RunError) as failure:
        export_command.export_run(exportable_run, out, **QUIET)
    assert re.fullmatch(rf"--out {re.escape(str(out))}: not enough space on the disk mounted at {re.escape(str(mount))} "
                        r"\(1\.0 MiB free; the bundle needs about \d+\.\d MiB\); free some space or choose --out on "
                        r"another disk; nothing was written", str(failure.value)), str(failure.value)

    def disk_fills(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.undo()  # room by the numbers, then the disk fills while the graph is written
    monkeypatch.setattr(export_command, "write_graph", disk_fills)
    with pytest.raises(RunError) as failure:
        export_command.export_run(exportable_run, out, **QUIET)
    assert str(failure.value).startswith(f"--out {out}: not enough space on the disk mounted at {mount} (")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_onnx_is_one_line_naming_the_extra(exportable_run, tmp_path):
    """Before the model loads: exit 1 (a missing optional package, README), not 'try --format torchscript'."""
    import subprocess
    import sys

    code = "import sys; sys.modules['onnx'] = None; from mmcore.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "export", str(exportable_run), "--out", str(tmp_path / "b")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == ("mmcore export needs the onnx package, which is not installed: "
                                     "pip install 'mmcore[export]' (or bash scripts/install.sh)")


# --- parity in float32 whatever the run trained in ----------------------------------------------------------------


def test_a_bf16_run_is_gated_in_fp32_with_the_bf16_deviation_as_information(tiny_recipe, tmp_path):
    """precision = "bf16" (autocast on the CPU too): the gate scores PyTorch in fp32 at 1e-4 and full agreement;
    how far bf16 is goes to parity.json beside it. --safetensors adds the state dict, the run's own tensors."""
    import torch
    from safetensors.torch import load_file

    from mmcore.commands.export import export_run
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    recipe = tiny_recipe("bf16.toml", experiment="bf16", text={"name": "none"}, pooling={"name": "attention"},
                         train={"modality": "vision_only", "precision": "bf16"}, cache={"dir": str(tmp_path / "cache")},
                         logging={"tensorboard": False})
    run = run_training(load_recipe(recipe), recipe_path=recipe, out=tmp_path / "run", **QUIET)
    out = tmp_path / "bundle"
    summary = export_run(run, out, safetensors=True, **QUIET)
    parity = json.loads((out / "parity.json").read_text())
    assert summary.parity == parity
    assert parity["torch_precision"] == "fp32" and parity["trained_precision"] == "bf16"
    assert parity["tolerance"] == {"score": 1e-4, "agreement": 1.0}
    assert parity["max_abs_calibrated_score_diff"] <= 1e-4 and parity["passed"] is True
    deviation = parity["trained_precision_deviation"]
    assert deviation["precision"] == "bfloat16" and deviation["rows"] == 32
    assert 0 < deviation["max_abs_calibrated_score_diff"]  # bf16 does differ; it decides nothing

    ckpt = torch.load(run / "checkpoint_best.ckpt", weights_only=True)
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(ckpt["model"]) and all(torch.equal(weights[k], v.cpu()) for k, v in ckpt["model"].items())
    assert "model.safetensors" in _manifest(out)["files"]


# --- the model card, and eval on a bundle -------------------------------------------------------------------------


def _card_table(card, heading):
    section = card.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]


def test_the_model_card_figures_are_the_runs_results(exported_bundle, exportable_run):
    from mmcore.export.card import METRICS

    card = (exported_bundle / "README.md").read_text()
    results = json.loads((exportable_run / "results.json").read_text())
    test, intervals = results["test"]["at_threshold"], results["test"]["intervals"]

    def same(printed, value):
        return printed == "n/a" if value is None else float(printed) == pytest.approx(value, abs=5e-5, rel=5e-3)

    rows = {row[0]: row for row in _card_table(card, "Test metrics")}
    assert list(rows) == [name for name in METRICS if name in test]
    for name, (_, value, interval) in rows.items():
        assert same(value, test[name]), name
        if name in intervals:
            low, high = (float(x) for x in interval.strip("[]").split(","))
            assert same(str(low), intervals[name][0]) and same(str(high), intervals[name][1])
    decision = results["decision"]
    assert f"`prediction = calibrated_score >= {decision['threshold']:.4f}`" in card
    assert f"sigmoid(logit / {decision['temperature']:.4f})" in card and decision["description"] in card
    slices = [(f"{group}: {s['slice']}", s) for group, rows_ in results["slices"].items() for s in rows_]
    assert len(_card_table(card, "Slices")) == len(slices)
    for row, (name, s) in zip(_card_table(card, "Slices"), slices):
        assert row[0] == name and int(row[1]) == s["n"] and int(row[3]) == s["errors"] and same(row[6], s["auroc"])
    modality = dict(_card_table(card, "Modality contribution"))
    for key, value in results["modality"].items():
        assert modality[key] == value if isinstance(value, str) else same(modality[key], value), key
    splits = {row[0]: int(row[2]) for row in _card_table(card, "Data and splits")}
    assert splits == results["data"]
    assert f"mmcore predict {exported_bundle} new.csv -o scored.csv" in card


def test_eval_on_a_bundle_gives_the_runs_metrics(exported_bundle, exportable_run, tmp_path):
    from mmcore.commands.evaluate import evaluate_bundle, evaluate_run

    by_run = json.loads((evaluate_run(exportable_run, out=tmp_path / "run", **QUIET) / "results.json").read_text())
    by_bundle = json.loads((evaluate_bundle(exported_bundle, out=tmp_path / "bundle", **QUIET) / "results.json").read_text())
    for at in ("at_0.5", "at_threshold"):
        assert by_bundle["test"][at] == pytest.approx(by_run["test"][at], abs=1e-5)
    assert by_bundle["decision"] == pytest.approx(by_run["decision"])
    assert by_bundle["data"] == by_run["data"] == {"eval": 32}
    assert by_bundle["slices"] == by_run["slices"]
    assert {"report.html", "test_report.md", "test_predictions.json", "roc.png"} <= {p.name for p in (tmp_path / "bundle").iterdir()}
    run_scores = {r["path"]: r["calibrated_score"] for r in json.loads((tmp_path / "run" / "test_predictions.json").read_text())}
    for row in json.loads((tmp_path / "bundle" / "test_predictions.json").read_text()):
        assert row["calibrated_score"] == pytest.approx(run_scores[row["path"]], abs=1e-5)


# --- a run and its bundle score alike ------------------------------------------------------------------------------

#: the real Dredze image-spam rows (read from ../shared/data, never copied); MMCORE_SHARED_DATA points elsewhere
DREDZE = Path(os.environ.get("MMCORE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "dredze_image_spam"


def _predict_both(run, bundle, csv, tmp_path, base_dir=None):
    """``{image: calibrated_score}`` of ``mmcore predict RUN`` and of ``mmcore predict BUNDLE`` on ``csv``."""
    from mmcore.commands.predict import predict_csv

    predict_csv(run, csv, tmp_path / "by_run.csv", base_dir=base_dir, **QUIET)
    predict_csv(bundle, csv, tmp_path / "by_bundle.csv", base_dir=base_dir, **QUIET)
    return [{r["local_image_path"]: float(r["calibrated_score"]) for r in _rows(tmp_path / f"by_{side}.csv")}
            for side in ("run", "bundle")]


def test_predict_run_equals_predict_csv(exportable_run, exported_bundle, demo_data, tmp_path):
    """Both in float32 from the raw rows (the run no longer through the float16 feature cache): within 1e-5."""
    by_run, by_bundle = _predict_both(exportable_run, exported_bundle, Path(demo_data) / "test.csv", tmp_path)
    assert by_run.keys() == by_bundle.keys() and len(by_run) == 32
    assert max(abs(by_run[k] - by_bundle[k]) for k in by_run) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not (DREDZE / "test.csv").is_file(), reason=f"real data not present at {DREDZE}")
def test_predict_run_equals_predict_bundle_on_dredze_rows(tmp_path):
    """A tiny run (fake CNN + a tiny MiniLM with the real tokenizer) on 48 real training rows, exported; 40 real test
    rows scored by the run and by its bundle agree within 1e-5 in calibrated score."""
    import tomli_w
    from tiny import tiny_recipe_data

    from mmcore.commands.export import export_run
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    splits = {}
    for split, count in (("train", 48), ("val", 24), ("test", 40)):
        every = _rows(DREDZE / f"{split}.csv")  # half spam, half ham
        rows = [r for r in every if r["label"] == "True"][:count // 2] + [r for r in every if r["label"] == "False"][:count // 2]
        for row in rows:
            row["local_image_path"] = str(DREDZE / row["local_image_path"])
        splits[split] = tmp_path / f"{split}.csv"
        with open(splits[split], "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["local_image_path", "label", "text_info"])
            writer.writeheader()
            writer.writerows(rows)
    recipe = tmp_path / "dredze_tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_data(
        tmp_path, experiment="dredze_tiny", text={"name": "minilm", "params": {"tiny": True}}, pooling={"name": "attention"},
        data={name: str(path) for name, path in splits.items()}, cache={"dir": str(tmp_path / "cache")},
        logging={"tensorboard": False})), encoding="utf-8")
    run = run_training(load_recipe(recipe), recipe_path=recipe, out=tmp_path / "run", **QUIET)
    bundle = tmp_path / "bundle"
    export_run(run, bundle, **QUIET)
    by_run, by_bundle = _predict_both(run, bundle, splits["test"], tmp_path)
    assert len(by_run) == 40 and by_run.keys() == by_bundle.keys()
    assert max(abs(by_run[k] - by_bundle[k]) for k in by_run) <= 1e-5


# --- the data-class registry --------------------------------------------------------------------------------------


def test_components_declare_their_data_classes_and_bundles_name_them_so(registry):
    """register(..., data_classes=(...)) is keyword-only and additive; names resolve to classes, never to imports."""
    import attrs

    from mmcore.interfaces import Preprocessing
    from mmcore.plugins.registry import Registry, UnknownDataClassError

    @attrs.frozen
    class Squares:
        side: int = 2

    reg = Registry()
    reg.register_function("vision", "pkg")("squares", lambda params: None, Squares, data_classes=(Squares,))
    assert reg.data_class_name(Squares, kind="vision", name="squares") == "vision/squares/Squares"
    assert reg.data_class("vision/squares/Squares") is Squares
    assert reg.data_class_name(Preprocessing, kind="vision", name="squares") == "mmcore/Preprocessing"
    assert reg.data_class("mmcore/Preprocessing") is Preprocessing
    assert reg.data_class_name(Squares, kind="vision", name="other") is None
    with pytest.raises(UnknownDataClassError) as failure:
        reg.data_class("mmcore/Popen")
    assert str(failure.value) == ("'mmcore/Popen': the mmcore core declares no data class 'Popen' "
                                  "(it declares: Preprocessing, ResizeCropPreprocessing)")
    with pytest.raises(MmcoreError) as failure:
        reg.add("vision", "bad", lambda params: None, Squares, "pkg", data_classes=(dict,))
    assert str(failure.value) == "pkg: vision encoder 'bad': data_classes must be attrs classes (got <class 'dict'>)"
    with pytest.raises(TypeError):  # keyword-only
        reg.register_function("vision", "pkg")("pos", lambda params: None, Squares, (Squares,))

    naflex = pytest.importorskip("mmcore_vision_siglip2.naflex")
    from mmcore.plugins.manager import get_registry

    assert get_registry().data_class("vision/siglip2_naflex_base/NaflexPreprocessing") is naflex.NaflexPreprocessing


def test_naflex_preprocessing_travels_through_inputs_json(tmp_path):
    """NaFlex's preprocessing (init=False fields, a variable patch axis) is described into inputs.json and rebuilt
    by registry name into an equal object that cuts an image into the same patches."""
    naflex = pytest.importorskip("mmcore_vision_siglip2.naflex")
    from PIL import Image

    from mmcore.export.bundle import describe_preprocessing
    from mmcore.export.inputs import describe_inputs, read_host_inputs
    from mmcore.plugins.manager import get_registry

    registry = get_registry()
    entry = registry.get("vision", "siglip2_naflex_base")
    original = entry.factory(entry.params_cls(tiny=True, max_num_patches=48)).preprocessing
    described = describe_preprocessing(original, registry, component="siglip2_naflex_base")
    (tmp_path / "inputs.json").write_text(json.dumps(describe_inputs(vision=described)))
    rebuilt = read_host_inputs(tmp_path, registry, bundle_format=4, vision=True, text=False)
    assert rebuilt.text is None
    assert isinstance(rebuilt.preprocessing, naflex.NaflexPreprocessing) and rebuilt.preprocessing == original
    image = Image.new("RGB", (70, 40), (200, 30, 90))
    for key, value in original(image).items():
        assert np.array_equal(rebuilt.preprocessing(image)[key].numpy(), value.numpy()), key

