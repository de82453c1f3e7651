"""Running an exported graph: :class:`GraphRunner` (onnxruntime for ONNX, torch.jit for TorchScript).

Apart from the exporter (:mod:`mmcore.export.onnx`, which imports torch's ONNX tracer), so that a
scoring process imports onnxruntime and nothing of the model code. The ``onnx`` package is
imported only to check a graph's external data references (:func:`check_external_data`), which
:func:`mmcore.export.bundle.read_manifest` does with the digests, not at every start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcore.devices import DeviceUnavailable, cuda_index, parse_device
from mmcore.export.schema import BundleError


#: the install line of the GPU build of onnxruntime (it replaces the CPU build; never both)
GPU_INSTALL = "bash scripts/install.sh --gpu (or pip uninstall onnxruntime && pip install 'mmcore[serve-gpu]')"


def onnx_providers(spec, available):
    """onnxruntime's providers for ``spec`` given the ``available`` ones (``get_available_providers()``)."""
    spec = parse_device(spec)
    cuda = "CUDAExecutionProvider" in available
    if spec == "cpu" or (spec == "auto" and not cuda):
        return ["CPUExecutionProvider"]
    if not cuda:
        raise DeviceUnavailable(
            f"--device {spec}: this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)}); "
            f"install the GPU build: {GPU_INSTALL}")
    return [("CUDAExecutionProvider", {"device_id": cuda_index(spec) if spec != "auto" else 0}), "CPUExecutionProvider"]


class GraphRunner:
    """Runs an exported graph on numpy inputs: onnxruntime for ONNX, torch.jit for TorchScript.

    ``device``: ``auto``/``cpu``/``cuda[:N]`` (:func:`mmcore.devices.parse_device`); CUDA asked for and
    not there is one line, never a CPU fallback. A bundle's graph has had its external data
    references checked with its digests (:func:`mmcore.export.bundle.read_manifest`) before it
    gets here; onnxruntime itself refuses a reference that leaves the graph's folder.
    """

    def __init__(self, path, fmt, *, device="auto"):
        path = Path(path)
        self.format = fmt
        self.requested = parse_device(device)
        if fmt == "onnx":
            from mmcore.kit.deps import require

            ort = require("onnxruntime", "scoring an ONNX bundle")
            providers = onnx_providers(self.requested, ort.get_available_providers())
            try:
                self.session = ort.InferenceSession(str(path), providers=providers)
            except _ort_errors() as exc:
                raise BundleError(f"{path}: onnxruntime cannot open it ({_one_line(exc)})") from None
            wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
            if wanted not in self.session.get_providers():  # onnxruntime falls back quietly when CUDA fails to load
                raise DeviceUnavailable(f"--device {self.requested}: onnxruntime could not start {wanted} "
                                        f"(running on {', '.join(self.session.get_providers())}); check the CUDA "
                                        f"and cuDNN libraries onnxruntime-gpu needs, or {GPU_INSTALL}")
            self.types = {i.name: _numpy_type(i.type) for i in self.session.get_inputs()}
        else:
            import torch

            from mmcore.engine.runtime import torch_device

            self.device = torch_device(self.requested)
            try:
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
            except (RuntimeError, ValueError) as exc:
                raise BundleError(f"{path}: not a TorchScript archive ({_one_line(exc)})") from None

    @property
    def providers(self):
        return self.session.get_providers() if self.format == "onnx" else [str(self.device)]

    @property
    def device_name(self):
        """Where the graph runs: ``cpu`` or ``cuda:N``."""
        if self.format != "onnx":
            return str(self.device)
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            return "cpu"
        options = self.session.get_provider_options().get("CUDAExecutionProvider", {})
        return f"cuda:{options.get('device_id', 0)}"

    def __call__(self, feeds):
        """``{input name: numpy array}`` -> logits as float64 [B]."""
        if self.format == "onnx":
            feeds = {name: np.asarray(value).astype(self.types[name], copy=False) for name, value in feeds.items()
                     if name in self.types}
            return self.session.run(["logit"], feeds)[0].astype(np.float64).reshape(-1)
        import torch

        with torch.no_grad():
            tensors = [torch.from_numpy(np.asarray(v)).to(self.device) for v in feeds.values()]
            return self.module(*tensors).double().cpu().numpy().reshape(-1)


def check_external_data(path, external_data):
    """Refuse an ONNX file that is not one, or whose tensors point anywhere but ``external_data``.

    Parsing the graph with ``onnx`` costs 0.7 s of imports here and a read of the whole file, so a
    bundle's graph is checked where its bytes are vouched for: with the digests, at its first
    opening on a machine, on ``--verify`` and at export (:func:`mmcore.export.bundle.read_manifest`).
    Opened later, the graph is the one checked while its manifest, sizes and modification times
    stay the same (:mod:`mmcore.export.verified`). Between checks onnxruntime stands guard: from
    1.24.1 (the floor in pyproject.toml; 1.23.2 opened all three) it refuses on its own a location
    that is absolute, climbs out of the graph's folder or is a link out of it (tests/test_export.py
    shows it); what it allows, another file in the folder, is what this check adds.
    """
    from google.protobuf.message import DecodeError

    from mmcore.kit.deps import require

    onnx = require("onnx", "opening an ONNX bundle")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, RecursionError) as exc:
        raise BundleError(f"{path}: not an ONNX model ({_one_line(exc)})") from None
    allowed = {external_data} if external_data else set()
    outside = sorted(external_locations(model) - allowed)
    if outside:
        where = f"only {external_data!r}" if external_data else "none (the manifest lists no external data)"
        raise BundleError(f"{path}: refers to external data {outside[0]!r}; a bundle's graph may use {where}")


def external_locations(model):
    """Every external data location a (loaded, data-less) ONNX model refers to: initializers,
    tensors in node attributes, and those of subgraphs and functions."""
    from onnx import AttributeProto, TensorProto

    def tensors(graph):
        yield from graph.initializer
        yield from (sparse.values for sparse in graph.sparse_initializer)
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node):
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                yield attribute.t
            yield from attribute.tensors
            if attribute.type == AttributeProto.GRAPH:
                yield from tensors(attribute.g)
            for graph in attribute.graphs:
                yield from tensors(graph)

    found = set()
    everything = [*tensors(model.graph), *(t for f in model.functions for n in f.node for t in node_tensors(n))]
    for tensor in everything:
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            found.add(entries.get("location", ""))
    return found


def _ort_errors():
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile, state.InvalidArgument,
            state.RuntimeException, state.NotImplemented)


def _one_line(exc):
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _numpy_type(onnx_type):
    return {
        "tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
        "tensor(bool)": np.bool_, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    }.get(onnx_type, np.float32)
