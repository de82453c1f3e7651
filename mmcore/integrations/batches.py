"""Batches of a data engine's job scored with a run or bundle: :class:`BatchScorer`.

Ray Data (``pip install 'mmcore[ray]'``) creates one per actor and calls it on every batch::

    import ray
    from mmcore.integrations.batches import BatchScorer

    ds = ray.data.read_parquet("/data/ads/new/")          # local_image_path, text_info, any other columns
    scored = ds.map_batches(BatchScorer, fn_constructor_kwargs={"source": "bundles/ads-v3", "base_dir": "/data/ads"},
                            batch_format="pandas", batch_size=256, concurrency=4, num_gpus=1)  # a GPU per actor
    scored.write_parquet("/data/ads/scored/")

The run or bundle is opened once per actor (:func:`~mmcore.scoring.scorers.open_scorer`); each batch
is scored by :func:`~mmcore.scoring.rows.score_rows`, the path ``mmcore predict`` takes, so the scores
are predict's. The batch comes back with ``score``, ``calibrated_score`` and ``prediction`` added
(null where an unreadable image was skipped under ``data.on_bad_image = "skip"``). Spark's
``predict_batch_udf`` calls it the same way (docs/distributed.md has the example).
"""

from __future__ import annotations

from mmcore.scoring.rows import collect, score_rows
from mmcore.scoring.scorers import open_scorer
from mmcore.scoring.tables import OUTPUT_COLUMNS, input_rules, rows_from_frame, with_scores

#: what a batch's rows are called in messages (``batch: row 3: image not found: ...``)
WHERE = "batch"


class BatchScorer:
    """A run or bundle that scores batches: pandas DataFrames, pyarrow Tables or dicts of numpy arrays
    (Ray Data's ``pandas``, ``pyarrow`` and ``numpy`` batch formats), each returned in its own format.

    ``device``: ``auto`` (the GPU the engine gives this actor, e.g. Ray's ``num_gpus=1``, else the
    CPU), ``cpu`` or ``cuda[:N]``. ``base_dir``: where relative ``local_image_path`` values start
    (default: the worker's current folder). ``batch_size``: rows per forward pass (default: the
    run's); ``workers``: decoding threads (default: the cores this process may use).
    """

    def __init__(self, source, *, device="auto", base_dir=None, batch_size=None, verify=None, workers=None):
        self.scorer = open_scorer(source, device=device, verify=verify)
        self.base_dir = base_dir
        self.batch_size = batch_size
        self.workers = workers
        self.rules = {**input_rules(self.scorer.recipe_data), "check_images": False}  # unreadable: the bad-image policy

    def __call__(self, batch):
        frame, kind = _as_frame(batch)
        if len(frame) == 0:
            return _like(with_scores(frame, [], [], [], []), kind)
        split = rows_from_frame(frame, WHERE, self.base_dir, **self.rules)
        scored = collect(score_rows(self.scorer, split, batch_size=self.batch_size, workers=self.workers))
        raw, calibrated, predicted = self.scorer.decide(scored.logits)
        return _like(with_scores(frame, [split.rows[int(i)] for i in scored.positions], raw, calibrated, predicted), kind)


def _as_frame(batch):
    """A batch as a pandas frame (positional index), and the format to give it back in."""
    import pandas as pd

    if isinstance(batch, pd.DataFrame):
        return batch.reset_index(drop=True), "pandas"
    if isinstance(batch, dict):
        return pd.DataFrame({name: list(values) for name, values in batch.items()}), "numpy"
    from mmcore.kit.deps import require

    if isinstance(batch, require("pyarrow", "scoring a batch that is not a pandas DataFrame").Table):
        return batch.to_pandas(), "pyarrow"
    raise TypeError(f"BatchScorer scores pandas DataFrames, pyarrow Tables or dicts of numpy arrays, not {type(batch).__name__}")


def _like(frame, kind):
    """``frame`` in the batch's own format: a dict's scores as float64 (NaN: not scored), its predictions as objects (None)."""
    import numpy as np

    if kind == "pandas":
        return frame
    if kind == "pyarrow":
        import pyarrow as pa

        return pa.Table.from_pandas(frame, preserve_index=False)
    out = {name: frame[name].to_numpy() for name in frame.columns if name not in OUTPUT_COLUMNS}
    out["score"] = frame["score"].to_numpy(dtype=np.float64, na_value=np.nan)
    out["calibrated_score"] = frame["calibrated_score"].to_numpy(dtype=np.float64, na_value=np.nan)
    out["prediction"] = frame["prediction"].to_numpy(dtype=object, na_value=None)
    return out
