"""The scoring path: a run directory or an export bundle scores rows the same way, downward.

- :mod:`.base`: :class:`~.base.Scorer`, what every scorer offers (decode, preprocess, logits,
  embeddings, the decision, metadata); scorers compose (an ensemble is a scorer of scorers).
- :mod:`.run`: :class:`~.run.RunScorer`, a run's PyTorch model in float32 from raw rows (no feature cache).
- :mod:`.bundle`: :class:`~.bundle.BundleScorer`, an export bundle through onnxruntime or TorchScript.
- :mod:`.scorers`: :func:`~.scorers.open_scorer`, a path -> the scorer of what is there.
- :mod:`.rows`: :func:`~.rows.score_rows`, the one streaming row scorer (decode and preprocess in
  threads, OCR where text is missing, the bad-image policy, batches in input order).
- :mod:`.tables`: the CSV a scoring command reads and the one it writes.

``mmcore predict``, ``mmcore eval``, the end of a training run (its test split), the export
parity gate and ``mmcore serve`` all score through these; docs/architecture.md ("Scoring rows")
shows the flow.
"""
