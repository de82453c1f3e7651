"""Export bundles: the fused model as ONNX (or TorchScript), its weights, decision and tokenizer, and the parity gate."""

#: the fused model's graph formats (named here, without torch, so the CLI starts fast)
FORMATS = ("onnx", "torchscript")
