"""``mmcore export --quantize int8``: the graph quantized by onnxruntime, kept only when its quality gate
passes against the fp32 graph on the parity rows, recorded in the manifest and the card; an int8
bundle runs on the CPU only."""

import json

import numpy as np
import pytest

from mmcore.commands.export import Int8Options, export_run


def _quiet(line):
    pass


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, exportable_run):
    """The shared tiny run exported with --quantize int8 (dynamic). Its one epoch leaves every score near
    the threshold, where int8 noise flips a decision or two of 32 and reorders a few: the gate asks for
    90 % agreement and an AUROC drop of 0.05 at most here."""
    out = tmp_path_factory.mktemp("int8") / "bundle"
    lines = []
    export_run(exportable_run, out, quantize=Int8Options(min_agreement=0.9, max_auroc_drop=0.05), progress=False,
               echo=lines.append)
    return out, lines


def test_an_int8_bundle_holds_the_quantized_graph_and_records_what_changed_and_the_gate(int8_bundle, exported_bundle):
    from mmcore.export.bundle import read_manifest
    from mmcore.scoring.scorers import open_scorer

    out, lines = int8_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and read_manifest(out).precision == "int8"
    quantization = manifest["quantization"]
    record, gate = quantization["record"], quantization["gate"]
    assert quantization["mode"] == "dynamic" and record["mode"] == "dynamic"
    assert record["quantized_ops"].get("MatMul", 0) + record["quantized_ops"].get("Gemm", 0) > 0
    # dynamic: matrix products; the fake CNN's convolutions stay fp32 (ConvInteger is slow on x86)
    assert quantization["op_types"] == ["MatMul", "Gemm"] and set(record["quantized_ops"]) <= {"MatMul", "Gemm"}
    assert record["weight_bytes_after"] < record["weight_bytes_before"]
    assert gate["passed"] and gate["rows"] == 32 and gate["min_agreement"] == 0.9 and gate["max_auroc_drop"] == 0.05
    assert lines[-2] == gate["reason"] and lines[-2].startswith("int8 kept: decisions agree on ")
    # the graph in the bundle is the int8 one (the tiny MiniLM's bytes are mostly its fp32 embedding table)
    import onnx

    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert "MatMulInteger" not in {node.op_type for node in onnx.load(str(exported_bundle / "model.onnx")).graph.node}
    card = (out / "README.md").read_text()  # the model card
    assert "## int8" in card and f"decisions agree on {gate['agreement']:.2%}" in card

    # scored through the scoring path, the bundle gives what the gate measured
    from mmcore.commands.export import parity_rows
    from mmcore.scoring.rows import collect, score_rows

    fp32, int8 = open_scorer(exported_bundle, device="cpu"), open_scorer(out, device="auto")
    assert int8.device_name == "cpu"  # auto: an int8 bundle runs on the CPU
    rows = parity_rows(int8.recipe, None, 32)
    _, _, fp32_decisions = fp32.decide(collect(score_rows(fp32, rows)).logits)
    _, int8_scores, int8_decisions = int8.decide(collect(score_rows(int8, rows)).logits)
    assert np.mean(fp32_decisions == int8_decisions) == gate["agreement"]
    assert 0 < np.abs(int8_scores - fp32.decide(collect(score_rows(fp32, rows)).logits)[1]).max() < 0.05


def test_an_int8_bundle_asked_to_run_on_cuda_is_one_line(int8_bundle, cli):
    from mmcore.errors import MmcoreError
    from mmcore.scoring.scorers import open_scorer

    out, _ = int8_bundle
    with pytest.raises(MmcoreError) as refused:
        open_scorer(out, device="cuda")
    assert str(refused.value) == f"{out}: an int8 bundle runs on CPU only; use --device cpu"
    assert refused.value.exit_code == 1
    served = cli("serve", out, "--device", "cuda", "--text", "optional", "--port", "0", check=False, timeout=120)
    assert served.returncode == 1
    assert served.stderr.strip().splitlines() == [f"{out}: an int8 bundle runs on CPU only; use --device cpu"]


def test_the_gate_refuses_a_graph_whose_quantization_flips_decisions_and_writes_nothing(exportable_run, tmp_path,
                                                                                         monkeypatch):
    from mmcore.export import int8 as I

    gate = I.quality_gate
    seen = []

    def threshold_on_a_row_int8_lowers(fp32, int8, labels, threshold, **limits):
        # the threshold forced onto the fp32 score of the row int8 lowers most: that row's decision flips
        row = int(np.argmin(int8 - fp32))
        assert int8[row] < fp32[row]
        seen.append(gate(fp32, int8, labels, fp32[row], **limits))
        return seen[-1]

    monkeypatch.setattr(I, "quality_gate", threshold_on_a_row_int8_lowers)
    out = tmp_path / "bundle"
    with pytest.raises(I.Int8Refused) as refused:
        export_run(exportable_run, out, quantize=Int8Options(), progress=False, echo=_quiet)
    (result,) = seen
    assert not result.passed and result.flipped >= 1
    assert str(refused.value) == f"{out}: {result.reason}; no bundle written"
    assert str(refused.value).startswith(f"{out}: int8 refused: decisions agree on ")
    assert refused.value.exit_code == 4
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial folder, no int8 work folder


def test_static_quantization_calibrates_on_the_parity_rows(exportable_run, tmp_path):
    out = tmp_path / "static"
    export_run(exportable_run, out, quantize=Int8Options(mode="static", calibration_rows=16, min_agreement=0.8, max_auroc_drop=0.05),
               progress=False, echo=_quiet)
    quantization = json.loads((out / "manifest.json").read_text())["quantization"]
    assert quantization["mode"] == "static" and quantization["calibration_rows"] == 16
    assert quantization["record"]["calibration_feeds"] == 1  # 16 rows: one batch of feeds
    assert quantization["record"]["added_ops"].get("QuantizeLinear", 0) > 0


def test_int8_flags_need_quantize_and_a_labelled_gate(exportable_run, tmp_path, cli):
    result = cli("export", exportable_run, "--out", tmp_path / "b", "--min-agreement", "0.9", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["--min-agreement: only with --quantize int8"]


def test_the_cli_flags_make_the_options_the_export_receives():
    from mmcore.cli.quantize import int8_choice

    flags = dict(quantize_mode=None, per_channel=None, calibration_rows=None, min_agreement=None, max_auroc_drop=None,
                 quantize_ops=None)
    assert int8_choice(None, **flags) is None
    assert int8_choice("int8", **flags) == Int8Options()
    chosen = int8_choice("int8", **{**flags, "quantize_mode": "static", "quantize_ops": "MatMul, Conv", "per_channel": True})
    assert chosen == Int8Options(mode="static", op_types=("MatMul", "Conv"), per_channel=True)
    assert chosen.ops == ["MatMul", "Conv"] and Int8Options(mode="static").ops is None
