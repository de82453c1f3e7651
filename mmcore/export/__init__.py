"""Export bundles: the fused model as ONNX (or TorchScript), its weights, decision and tokenizer, and the parity gate."""
