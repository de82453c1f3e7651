"""int8 quantization of a real ONNX graph (mmcore.export.quantize) run through onnxruntime, and the
quality gate on hand-made arrays and on a graph whose quantization flips decisions."""

import warnings

import numpy as np
import pytest

from mmcore.errors import RunError
from mmcore.export.quantize import quality_gate, quantize_graph

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


class Tiny(torch.nn.Module):
    """An image branch (conv) and a text branch (linear) fused by an MLP: the shape of mmcore's graphs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.text = torch.nn.Linear(16, 32)
        self.fc1 = torch.nn.Linear(8 * 8 * 8 + 32, 64)
        self.fc2 = torch.nn.Linear(64, 1)

    def forward(self, image, text):
        fused = torch.cat([torch.relu(self.conv(image)).flatten(1), torch.tanh(self.text(text))], 1)
        return self.fc2(torch.relu(self.fc1(fused))).reshape(-1)


def _export(model, path, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.randn(2, 3, 8, 8), torch.randn(2, 16))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), example, str(path), input_names=["image", "text"], output_names=["logit"],
                          dynamic_axes={"image": {0: "batch"}, "text": {0: "batch"}, "logit": {0: "batch"}},
                          opset_version=18, dynamo=False)
    if save:
        onnx.save_model(onnx.load(str(path)), str(path), **save)
    return path


def _feeds(n, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"image": (rng.standard_normal((n, 3, 8, 8)) * scale).astype(np.float32),
            "text": (rng.standard_normal((n, 16)) * scale).astype(np.float32)}


def _logits(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logit"], feeds)[0].astype(np.float64)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """``plain``: a random Tiny; ``offset``: the same with 30 added to fc1's output (compensated in
    fc2's bias): its activations sit far from zero, where int8 steps are coarse next to their spread."""
    root = tmp_path_factory.mktemp("quantize")
    torch.manual_seed(0)
    model = Tiny()
    plain = _export(model, root / "plain.onnx")
    with torch.no_grad():
        model.fc1.bias += 30.0
        model.fc2.bias -= 30.0 * model.fc2.weight.sum()
    return {"plain": plain, "offset": _export(model, root / "offset.onnx"), "root": root}


def test_dynamic_int8_graph_is_smaller_scores_close_and_records_what_changed(graphs, tmp_path, caplog):
    before = graphs["plain"].read_bytes()
    record = quantize_graph(graphs["plain"], tmp_path / "int8" / "model.onnx")
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]  # onnxruntime's advice is dropped
    assert graphs["plain"].read_bytes() == before  # the source is untouched
    assert [p.name for p in (tmp_path / "int8").iterdir()] == ["model.onnx"]  # no temporary folder left
    assert record.mode == "dynamic" and not record.external_data
    assert record.quantized_ops == {"Conv": 1, "Gemm": 3}
    assert record.added_ops["MatMulInteger"] == 3 and record.added_ops["ConvInteger"] == 1
    assert record.weight_bytes_after < record.weight_bytes_before / 3
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < graphs["plain"].stat().st_size / 3

    feeds = _feeds(500)
    fp32, int8 = _logits(graphs["plain"], feeds), _logits(tmp_path / "int8" / "model.onnx", feeds)
    assert np.abs(fp32 - int8).max() < 0.02
    assert np.corrcoef(fp32, int8)[0, 1] > 0.99
    labels = (np.random.default_rng(1).random(500) < _sigmoid((fp32 - fp32.mean()) / fp32.std())).astype(int)
    gate = quality_gate(_sigmoid(fp32), _sigmoid(int8), labels, 0.5)
    assert gate.passed, gate.reason
    assert gate.reason.startswith("int8 kept: decisions agree on ")


def test_the_gate_refuses_a_graph_whose_quantization_flips_decisions_at_the_median(graphs, tmp_path):
    record = quantize_graph(graphs["offset"], tmp_path / "offset-int8.onnx")
    assert record.quantized_ops == {"Conv": 1, "Gemm": 3}
    feeds = _feeds(1000)
    fp32, int8 = _sigmoid(_logits(graphs["offset"], feeds)), _sigmoid(_logits(tmp_path / "offset-int8.onnx", feeds))
    labels = (np.random.default_rng(2).random(1000) < _sigmoid((fp32 - np.median(fp32)) / fp32.std())).astype(int)
    threshold = float(np.median(fp32))  # half the rows within a hair of it: the densest place for a threshold
    gate = quality_gate(fp32, int8, labels, threshold)
    assert not gate.passed
    assert gate.flipped > 20 and gate.agreement < 0.98
    assert gate.reason.startswith(f"int8 refused: decisions agree on {gate.agreement:.2%} of 1000 rows ({gate.flipped} flipped")


def test_static_int8_uses_the_calibration_feeds_and_unlike_rows_fail_the_gate(graphs, tmp_path):
    feeds = _feeds(400, seed=3)
    batches = [{name: value[i:i + 100] for name, value in feeds.items()} for i in range(0, 400, 100)]
    record = quantize_graph(graphs["plain"], tmp_path / "static.onnx", mode="static", calibration=batches,
                            per_channel=True)
    assert record.mode == "static" and record.per_channel and record.calibration_feeds == 4
    assert record.quantized_ops == {"Conv": 1, "Gemm": 3}
    assert record.added_ops["QuantizeLinear"] >= 4 and record.added_ops["DequantizeLinear"] >= 4

    test = _feeds(500, seed=4)
    fp32 = _logits(graphs["plain"], test)
    assert np.abs(fp32 - _logits(tmp_path / "static.onnx", test)).max() < 0.1
    # calibrated on rows 50 times smaller than those it scores: activations saturate
    small = [{name: value * 0.02 for name, value in batch.items()} for batch in batches]
    quantize_graph(graphs["plain"], tmp_path / "miscalibrated.onnx", mode="static", calibration=small)
    labels = (fp32 > np.median(fp32)).astype(int)
    gate = quality_gate(_sigmoid(fp32), _sigmoid(_logits(tmp_path / "miscalibrated.onnx", test)), labels,
                        float(np.median(_sigmoid(fp32))))
    assert not gate.passed and gate.agreement < 0.9


def test_a_graph_with_external_data_is_quantized_with_external_data(tmp_path):
    torch.manual_seed(1)
    src = _export(Tiny(), tmp_path / "src" / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=0)
    listing = sorted(p.name for p in src.parent.iterdir())
    record = quantize_graph(src, tmp_path / "out" / "model.onnx")
    assert sorted(p.name for p in src.parent.iterdir()) == listing  # nothing left next to the source
    assert record.external_data
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "model.onnx.data"]
    feeds = _feeds(64)
    assert np.abs(_logits(src, feeds) - _logits(tmp_path / "out" / "model.onnx", feeds)).max() < 0.02


def test_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(RunError) as error:
        quantize_graph(tmp_path / "junk.onnx", tmp_path / "out.onnx")
    assert str(error.value) == f"{tmp_path / 'junk.onnx'}: not an ONNX graph (it does not parse as one)"
    with pytest.raises(RunError) as error:
        quantize_graph(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert str(error.value) == f"{tmp_path / 'missing.onnx'}: ONNX graph: not found; check the path"
    with pytest.raises(ValueError, match=r"^unknown quantization mode 'int4'; one of dynamic, static$"):
        quantize_graph(tmp_path / "junk.onnx", tmp_path / "out.onnx", mode="int4")
    with pytest.raises(ValueError, match=r"^static quantization needs calibration feeds$"):
        quantize_graph(tmp_path / "junk.onnx", tmp_path / "out.onnx", mode="static")


# ------------------------------------------------------------------------------------ the gate on arrays


def test_gate_refuses_flips_in_a_dense_score_region():
    # 200 rows whose fp32 scores crowd 0.495..0.505 around the threshold 0.5; int8 moves each by
    # +-0.006 (alternating), so every row within 0.006 of 0.5 on the moving side flips: 20% of them
    fp32 = np.linspace(0.495, 0.505, 200)
    int8 = fp32 + np.where(np.arange(200) % 2 == 0, 0.006, -0.006)
    labels = (np.arange(200) >= 100).astype(int)
    flipped = int(((fp32 >= 0.5) != (int8 >= 0.5)).sum())
    assert flipped == 200 // 2  # by the construction above: every row is within 0.006 of 0.5
    gate = quality_gate(fp32, int8, labels, 0.5)
    assert not gate.passed
    assert gate.flipped == flipped and gate.agreement == 0.5
    assert gate.auroc_fp32 == 1.0
    assert gate.reason == (
        f"int8 refused: decisions agree on 50.00% of 200 rows (100 flipped at threshold 0.5; min 99.00%); "
        f"AUROC drops {gate.auroc_drop:.4f} (1.0000 -> {gate.auroc_int8:.4f}; max 0.002)"
    )


def test_gate_passes_close_scores_and_says_so():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    fp32 = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.15, 1000), 0, 1)
    int8 = np.clip(fp32 + rng.normal(0, 1e-4, 1000), 0, 1)
    gate = quality_gate(fp32, int8, labels, 0.5)
    assert gate.passed
    assert gate.flipped <= 10
    assert gate.reason == (
        f"int8 kept: decisions agree on {gate.agreement:.2%} of 1000 rows (min 99.00%), "
        f"AUROC {gate.auroc_fp32:.4f} -> {gate.auroc_int8:.4f} (max drop 0.002)"
    )
    assert gate.to_json()["passed"] is True


def test_gate_refuses_a_lost_ranking_even_when_decisions_agree():
    # every row keeps its side of 0.5, so every decision agrees, but int8 reorders the rows within each side
    fp32 = np.array([0.9, 0.8, 0.7, 0.45, 0.2, 0.1])
    int8 = np.array([0.6, 0.7, 0.95, 0.1, 0.2, 0.45])
    labels = np.array([1, 1, 0, 1, 0, 0])
    gate = quality_gate(fp32, int8, labels, 0.5)
    assert gate.agreement == 1.0
    # fp32: positives 0.9, 0.8, 0.45 over negatives 0.7, 0.2, 0.1 -> 2*3 + 2 = 8/9
    # int8: positives 0.6, 0.7, 0.1 over negatives 0.95, 0.2, 0.45 -> 2 + 2 + 0 = 4/9
    assert gate.auroc_fp32 == pytest.approx(8 / 9) and gate.auroc_int8 == pytest.approx(4 / 9)
    assert not gate.passed
    assert gate.reason == "int8 refused: AUROC drops 0.4444 (0.8889 -> 0.4444; max 0.002)"


def test_gate_without_both_classes_checks_agreement_only():
    gate = quality_gate([0.2, 0.7], [0.21, 0.69], [1, 1], 0.5)
    assert gate.passed and gate.auroc_drop is None
    assert gate.reason.endswith("AUROC not checked (one class in the labels)")


def test_gate_rejects_arrays_of_different_lengths():
    with pytest.raises(ValueError, match=r"^int8 scores and labels differ in length \(1 vs 2\)$"):
        quality_gate([0.2, 0.7], [0.2], [0, 1], 0.5)
