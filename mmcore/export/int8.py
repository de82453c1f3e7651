"""``mmcore export --quantize int8``: the fp32 bundle that passed parity, its graph quantized
(:func:`mmcore.export.quantize.quantize_graph`) and kept only when the quality gate
(:func:`mmcore.export.quantize.quality_gate`) passes on the parity rows.

The gate compares what users see: the fp32 graph's and the int8 graph's calibrated scores of the
same labelled rows (the run's validation split by default), decisions at the run's threshold and
AUROC. A refused graph leaves nothing behind: the export fails with the gate's line (exit 4).
A kept one replaces the fp32 graph in the bundle; ``manifest.json`` says ``"precision": "int8"``
and holds ``quantization`` (what was quantized, the gate's figures), which the model card shows.
An int8 bundle runs on the CPU only (:func:`mmcore.export.bundle.bundle_device`): onnxruntime's CUDA provider has no
int8 path mmcore supports, and a partial fallback would be slower than fp32 on the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import numpy as np

from mmcore.errors import MmcoreError, RunError
from mmcore.export.quantize import DEFAULT_MAX_AUROC_DROP, DEFAULT_MIN_AGREEMENT, MODES, quality_gate, quantize_graph

#: the precisions a bundle's graph may have (``manifest.json``'s ``precision``)
PRECISIONS = ("fp32", "int8")
#: static quantization calibrates on at most this many of the parity rows by default
DEFAULT_CALIBRATION_ROWS = 256
#: the node types dynamic quantization converts by default: matrix products (MatMulInteger), where
#: int8 pays. Convolutions stay fp32: onnxruntime's ConvInteger is slower than its fp32 Conv on x86
#: CPUs (the tiny and the demo model with them quantized ran at 0.25-0.28x fp32's rows/s:
#: ``bench/int8.py --ops MatMul,Gemm,Conv``, docs/performance.md);
#: embedding tables (Gather) too: quantizing them saves bytes, not time, and moves every token
DYNAMIC_OPS = ("MatMul", "Gemm")
_BATCH = 16


@attrs.frozen(kw_only=True)
class Int8Options:
    """``export --quantize int8``'s flags."""

    mode: str = attrs.field(default="dynamic", validator=attrs.validators.in_(MODES))
    per_channel: bool = False
    #: static only: parity rows the activation ranges are calibrated on
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_auroc_drop: float = DEFAULT_MAX_AUROC_DROP
    #: the node types to quantize; None: :data:`DYNAMIC_OPS` for dynamic, onnxruntime's list for static
    op_types: tuple[str, ...] | None = None

    @property
    def ops(self):
        """The node types handed to the quantizer (None: onnxruntime's own list)."""
        if self.op_types is not None:
            return list(self.op_types)
        return list(DYNAMIC_OPS) if self.mode == "dynamic" else None


class Int8Refused(RunError):
    """The quality gate refused the int8 graph (exit 4): nothing was written."""


def _batches(rows, size):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def graph_feeds(scorer, split, *, limit=None):
    """The graph inputs of ``split``'s rows (images decoded and preprocessed, texts as given) in batches."""
    positions = list(range(len(split) if limit is None else min(limit, len(split))))
    for batch in _batches(positions, _BATCH):
        items = [scorer.preprocess(scorer.load_image(split.paths[i])) for i in batch] if scorer.uses_vision else None
        yield scorer.feeds(items, [split.texts[i] for i in batch])


def quantize_bundle(folder, info, scorer, split, options, *, out):
    """Quantize the graph of the bundle being written in ``folder`` (described by ``info``, scored by
    ``scorer``, the fp32 bundle's :class:`~mmcore.scoring.bundle.BundleScorer` on the CPU) and gate it on
    ``split`` (the parity rows as scored); returns ``info`` for the int8 bundle, or raises :class:`Int8Refused`.
    """
    from mmcore.export.runner import GraphRunner

    if info["graph"]["format"] != "onnx":
        raise MmcoreError(f"--quantize int8: needs --format onnx (onnxruntime quantizes ONNX graphs; got {info['graph']['format']})")
    if split.labels is None:
        raise MmcoreError(f"--quantize int8: the quality gate needs labelled rows; {split.csv} has no label column")
    folder = Path(folder)
    graph = folder / info["graph"]["file"]
    work = folder.parent / f".{folder.name}.int8"
    int8_graph = work / graph.name
    calibration = (graph_feeds(scorer, split, limit=options.calibration_rows) if options.mode == "static" else None)
    record = quantize_graph(graph, int8_graph, mode=options.mode, calibration=calibration, per_channel=options.per_channel,
                            op_types=options.ops)
    try:
        runner = GraphRunner(int8_graph, "onnx", device="cpu")  # the quantizer's own graph: nothing to check
        fp32, int8 = [], []
        for feeds in graph_feeds(scorer, split):
            fp32.append(scorer.runner(feeds))
            int8.append(runner(feeds))
        _, fp32_scores, _ = scorer.decide(np.concatenate(fp32))
        _, int8_scores, _ = scorer.decide(np.concatenate(int8))
        gate = quality_gate(fp32_scores, int8_scores, split.label_array(), scorer.decision["threshold"],
                            min_agreement=options.min_agreement, max_auroc_drop=options.max_auroc_drop)
        if not gate.passed:
            raise Int8Refused(f"{out}: {gate.reason}; no bundle written")
        _replace_graph(folder, info, work)
    finally:
        for leftover in work.glob("*") if work.is_dir() else []:
            leftover.unlink()
        if work.is_dir():
            work.rmdir()
    graph_info = {**info["graph"]}
    graph_info.pop("external_data", None)
    if record.external_data:
        graph_info["external_data"] = graph.name + ".data"
    quantization = {"mode": options.mode, "per_channel": options.per_channel, "op_types": options.ops,
                    "calibration_rows": min(options.calibration_rows, len(split)) if options.mode == "static" else 0,
                    "record": record.to_json(), "gate": {**gate.to_json(), "data": str(split.csv)}}
    return {**info, "graph": graph_info, "precision": "int8", "quantization": quantization}


def _replace_graph(folder, info, work):
    """The int8 graph (and its data file, if any) in place of the fp32 one and its external data."""
    external = info["graph"].get("external_data")
    if external:
        os.remove(folder / external)
    for path in sorted(work.iterdir(), key=lambda p: p.suffix == ".onnx"):  # the graph last
        os.replace(path, folder / path.name)


def card_lines(quantization):
    """The model card's section on an int8 bundle: what was quantized and the gate's figures."""
    record, gate = quantization["record"], quantization["gate"]
    ops = ", ".join(f"{op} x{n}" for op, n in record["quantized_ops"].items()) or "none"
    auroc = ("not checked (one class)" if gate["auroc_drop"] is None
             else f"{gate['auroc_fp32']:.4f} -> {gate['auroc_int8']:.4f} (max drop {gate['max_auroc_drop']:g})")
    return ["## int8", "",
            f"Quantized by onnxruntime ({quantization['mode']}, per-channel {'yes' if quantization['per_channel'] else 'no'}): "
            f"{ops}; weights {record['weight_bytes_before']} -> {record['weight_bytes_after']} bytes. It runs on the CPU only.",
            f"Quality gate on {gate['rows']} rows of `{gate['data']}` against the fp32 graph: decisions agree on "
            f"{gate['agreement']:.2%} (min {gate['min_agreement']:.2%}, {gate['flipped']} flipped at threshold "
            f"{gate['threshold']:.4g}); AUROC {auroc}.", ""]
