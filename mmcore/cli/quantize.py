"""``mmcore export --quantize int8`` and the flags of its quality gate (mmcore.export.int8)."""

from __future__ import annotations

import click

from mmcore.commands.export import INT8_DEFAULTS, Int8Options
from mmcore.errors import MmcoreError

_FLAGS = {"quantize_mode": "--quantize-mode", "per_channel": "--per-channel", "calibration_rows": "--calibration-rows",
          "min_agreement": "--min-agreement", "max_auroc_drop": "--max-auroc-drop", "quantize_ops": "--quantize-ops"}


def int8_options(command):
    """The ``--quantize`` option and the int8 flags, in help order."""
    options = [
        click.option("--quantize", type=click.Choice(["int8"]), default=None,
                     help="Also quantize the graph to int8 (onnxruntime) and keep it only if its quality gate passes "
                          "on the parity rows; an int8 bundle runs on the CPU only."),
        click.option("--quantize-mode", type=click.Choice(["dynamic", "static"]), default=None,
                     help=f"int8: dynamic (weights int8, activations per batch; no data) or static (activations "
                          f"calibrated on parity rows) [default: {INT8_DEFAULTS.mode}]."),
        click.option("--quantize-ops", default=None, metavar="OP,OP",
                     help="int8: the ONNX node types to quantize, e.g. MatMul,Gemm,Conv [default: dynamic: "
                          "MatMul,Gemm (convolutions stay fp32: ConvInteger is slow on x86); static: "
                          "onnxruntime's list]."),
        click.option("--per-channel", is_flag=True, default=None, help="int8: one scale per output channel of each weight."),
        click.option("--calibration-rows", type=click.IntRange(min=1), default=None,
                     help=f"int8 static: parity rows to calibrate on [default: {INT8_DEFAULTS.calibration_rows}]."),
        click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
                     help=f"int8 gate: smallest share of parity rows whose decision must match the fp32 graph's "
                          f"[default: {INT8_DEFAULTS.min_agreement}]."),
        click.option("--max-auroc-drop", type=click.FloatRange(min=0), default=None,
                     help=f"int8 gate: largest AUROC loss on the parity rows [default: {INT8_DEFAULTS.max_auroc_drop}]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def int8_choice(quantize, **flags):
    """The :class:`Int8Options` the flags ask for (None without ``--quantize``; an int8 flag without it is one line)."""
    given = {key: value for key, value in flags.items() if value is not None}
    if quantize is None:
        if given:
            raise MmcoreError(f"{_FLAGS[next(iter(given))]}: only with --quantize int8")
        return None
    if "quantize_mode" in given:
        given["mode"] = given.pop("quantize_mode")
    if "quantize_ops" in given:
        given["op_types"] = tuple(op.strip() for op in given.pop("quantize_ops").split(",") if op.strip())
    return Int8Options(**given)
