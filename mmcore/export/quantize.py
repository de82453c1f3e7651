"""int8 graphs: an exported ONNX graph quantized with onnxruntime, and the quality gate that
decides whether the int8 graph may replace the fp32 one.

Quantization (:func:`quantize_graph`) is onnxruntime's:

- ``dynamic``: weights stored as int8, activations quantized on the fly per batch
  (``quantize_dynamic``, QOperator: MatMulInteger, ConvInteger, ...); needs no data. What
  onnxruntime recommends for transformers (text encoders, ViTs).
- ``static``: weights and activations int8, activation ranges calibrated on real inputs
  (``quantize_static``, QDQ format, uint8 activations and int8 weights as onnxruntime advises for
  x86 CPUs); needs ``calibration``: input feeds of rows the model will see (validation rows).

A graph whose weights live in external data files (over 2 GB) is quantized with its int8
weights in external data too. The record (:class:`QuantizationRecord`) says what changed: the
node types whose weights became int8 and how many, the nodes before and after, the initializer
bytes before and after.

Quantization changes scores by more than an fp32 export's 1e-4 parity, so the gate
(:func:`quality_gate`) judges what users see instead: how often the int8 graph's decisions
agree with the fp32 graph's at the run's threshold, and how much AUROC it loses, on the same
labelled rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import attrs
import numpy as np

from mmcore.errors import RunError, os_error_line
from mmcore.evaluation.metrics import check_scores_labels, rank_auroc

MODES = ("dynamic", "static")
DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_MAX_AUROC_DROP = 0.002
#: onnxruntime's own threshold for writing a quantized model's weights as external data
_PROTOBUF_LIMIT = 2**31
_INT8_TYPES = {2, 3}  # onnx.TensorProto.UINT8, INT8


@attrs.frozen(kw_only=True)
class QuantizationRecord:
    """What :func:`quantize_graph` did, for the bundle's manifest (:meth:`to_json`)."""

    mode: str
    per_channel: bool
    #: op type -> nodes of the fp32 graph whose weights are int8 in the new graph
    quantized_ops: dict
    #: op type -> nodes the quantizer added (DynamicQuantizeLinear, QuantizeLinear, ...)
    added_ops: dict
    nodes_before: int
    nodes_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    external_data: bool
    calibration_feeds: int = 0

    def to_json(self):
        return attrs.asdict(self)


def _initializer_bytes(tensor):
    """A tensor's byte size from its dims and type, without loading external data."""
    import onnx

    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _has_external_data(model):
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _float_weights(model):
    """Names of the float initializers with at least 2 dimensions: the weights a quantizer replaces."""
    return {t.name for t in model.graph.initializer if t.data_type not in _INT8_TYPES and len(t.dims) >= 2}


def _record(before, after, *, mode, per_channel, external, feeds):
    # a weight the quantizer replaced is gone from the new graph (it holds NAME_quantized instead)
    replaced = _float_weights(before) - {t.name for t in after.graph.initializer}
    quantized = Counter(node.op_type for node in before.graph.node if replaced.intersection(node.input))
    types_before = Counter(node.op_type for node in before.graph.node)
    types_after = Counter(node.op_type for node in after.graph.node)
    return QuantizationRecord(
        mode=mode,
        per_channel=per_channel,
        quantized_ops=dict(sorted(quantized.items())),
        added_ops=dict(sorted((types_after - types_before).items())),
        nodes_before=len(before.graph.node),
        nodes_after=len(after.graph.node),
        weight_bytes_before=sum(_initializer_bytes(t) for t in before.graph.initializer),
        weight_bytes_after=sum(_initializer_bytes(t) for t in after.graph.initializer),
        external_data=external,
        calibration_feeds=feeds,
    )


def _calibration_reader(feeds, input_names):
    """``feeds`` (an iterable of ``{input name: array}``) as onnxruntime's CalibrationDataReader, counting them."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)
            self.count = 0

        def get_next(self):
            feed = next(self.feeds, None)
            if feed is None:
                return None
            self.count += 1
            return {name: np.asarray(value) for name, value in feed.items() if name in input_names}

    return Reader()


@contextlib.contextmanager
def _quiet_preprocessing_advice():
    """onnxruntime's quantizers log "Please consider to run pre-processing" on the root logger for
    every graph; the graphs mmcore exports are already shape-inferred and folded by the exporter."""

    def drop(record):
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _move_into_place(work, dst):
    """Move the quantized graph (and its external data file) from ``work`` to ``dst``'s folder, data first."""
    produced = sorted(work.iterdir(), key=lambda p: p.name == dst.name)  # the graph last: readers see it complete
    for path in produced:
        os.replace(path, dst.parent / path.name)


def quantize_graph(src_onnx, dst_onnx, *, mode="dynamic", calibration=None, per_channel=False, op_types=None):
    """Quantize the ONNX graph ``src_onnx`` to int8 into ``dst_onnx``; returns a :class:`QuantizationRecord`.

    ``mode``: ``"dynamic"`` or ``"static"`` (see the module docstring); ``calibration``: for
    static, an iterable of input feeds ``{input name: numpy array}`` (names the graph lacks are
    left out); ``per_channel``: one scale per output channel of each weight (more accurate for
    convolutions, a little slower); ``op_types``: the node types to quantize (default:
    onnxruntime's list for the mode). The source is not modified; ``dst_onnx`` (and, for an
    external-data graph, ``dst_onnx`` + ``.data``) appears only once complete.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; one of {', '.join(MODES)}")
    if mode == "static" and calibration is None:
        raise ValueError("static quantization needs calibration feeds")
    src, dst = Path(src_onnx), Path(dst_onnx)
    try:
        before = onnx.load(str(src), load_external_data=False)
    except OSError as exc:
        raise RunError(os_error_line(src, exc, what="ONNX graph")) from None
    except DecodeError:
        raise RunError(f"{src}: not an ONNX graph (it does not parse as one)") from None
    external = _has_external_data(before) or before.ByteSize() >= _PROTOBUF_LIMIT
    # a graph without external data is handed over in memory, so onnxruntime writes its
    # shape-inferred copy to its own temporary folder, not next to the source
    source = str(src) if external else onnx.load(str(src))
    options = {"per_channel": per_channel, "use_external_data_format": external, "op_types_to_quantize": op_types}
    dst.parent.mkdir(parents=True, exist_ok=True)
    feeds = 0
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as work, _quiet_preprocessing_advice():
        work = Path(work)
        try:
            if mode == "dynamic":
                quantize_dynamic(source, work / dst.name, weight_type=QuantType.QInt8, **options)
            else:
                reader = _calibration_reader(calibration, {i.name for i in before.graph.input})
                quantize_static(
                    source, work / dst.name, reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **options,
                )
                feeds = reader.count
        except (ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RunError(f"{src}: int8 quantization ({mode}) failed: {first}") from None
        after = onnx.load(str(work / dst.name), load_external_data=False)
        _move_into_place(work, dst)
    return _record(before, after, mode=mode, per_channel=per_channel, external=external, feeds=feeds)


@attrs.frozen(kw_only=True)
class GateResult:
    """The quality gate's figures and decision; ``reason`` is the one line a user reads."""

    passed: bool
    reason: str
    rows: int
    threshold: float
    #: fraction of rows whose decision (score >= threshold) is the same in both graphs
    agreement: float
    flipped: int
    #: None when the labels hold one class
    auroc_fp32: float | None
    auroc_int8: float | None
    #: ``auroc_fp32 - auroc_int8`` (positive: int8 is worse); None without AUROC
    auroc_drop: float | None
    min_agreement: float
    max_auroc_drop: float

    def to_json(self):
        return attrs.asdict(self)


def quality_gate(fp32_scores, int8_scores, labels, threshold, *, min_agreement=DEFAULT_MIN_AGREEMENT,
                 max_auroc_drop=DEFAULT_MAX_AUROC_DROP):
    """Whether the int8 graph's scores may replace the fp32 graph's on the same rows (a :class:`GateResult`).

    ``fp32_scores`` and ``int8_scores``: calibrated scores in [0, 1] of the same rows, in the same
    order; ``labels``: their 0/1 labels; ``threshold``: the run's decision threshold (a decision
    is ``score >= threshold``). Passes when decisions agree on at least ``min_agreement`` of the
    rows and AUROC drops by at most ``max_auroc_drop`` (the AUROC check is skipped, and the reason
    says so, when the labels hold one class).
    """
    fp32, labels = check_scores_labels(fp32_scores, labels, what="fp32 scores", purpose="gate")
    int8, _ = check_scores_labels(int8_scores, labels, what="int8 scores", purpose="gate")
    threshold = float(threshold)
    flipped = int(((fp32 >= threshold) != (int8 >= threshold)).sum())
    agreement = 1.0 - flipped / fp32.size
    auroc_fp32, auroc_int8 = rank_auroc(fp32, labels), rank_auroc(int8, labels)
    drop = None if auroc_fp32 is None else auroc_fp32 - auroc_int8

    problems = []
    if agreement < min_agreement:
        problems.append(f"decisions agree on {agreement:.2%} of {fp32.size} rows ({flipped} flipped at threshold "
                        f"{threshold:.4g}; min {min_agreement:.2%})")
    if drop is not None and drop > max_auroc_drop:
        problems.append(f"AUROC drops {drop:.4f} ({auroc_fp32:.4f} -> {auroc_int8:.4f}; max {max_auroc_drop:g})")
    if problems:
        reason = "int8 refused: " + "; ".join(problems)
    else:
        auroc = ("AUROC not checked (one class in the labels)" if drop is None
                 else f"AUROC {auroc_fp32:.4f} -> {auroc_int8:.4f} (max drop {max_auroc_drop:g})")
        reason = (f"int8 kept: decisions agree on {agreement:.2%} of {fp32.size} rows (min {min_agreement:.2%}), "
                  f"{auroc}")
    return GateResult(
        passed=not problems, reason=reason, rows=int(fp32.size), threshold=threshold, agreement=agreement,
        flipped=flipped, auroc_fp32=auroc_fp32, auroc_int8=auroc_int8, auroc_drop=drop,
        min_agreement=float(min_agreement), max_auroc_drop=float(max_auroc_drop),
    )
