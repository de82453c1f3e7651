"""Ray Data scores a CSV through `mmcore.integrations.batches.BatchScorer`, one actor per run or bundle
opened once, with the scores `mmcore predict` gives (a local Ray of 2 CPUs)."""

import csv
from pathlib import Path

import numpy as np
import pytest

from mmcore.commands.predict import predict_csv
from mmcore.integrations.batches import BatchScorer


def _predicted(source, demo_data, tmp_path):
    """``{image path: (score, calibrated_score, prediction)}`` of `mmcore predict` on the demo test split."""
    out = tmp_path / "predicted.csv"
    predict_csv(source, Path(demo_data) / "test.csv", out, progress=False, echo=lambda line: None)
    with open(out, newline="", encoding="utf-8") as handle:
        return {r["local_image_path"]: (float(r["score"]), float(r["calibrated_score"]), r["prediction"] == "True")
                for r in csv.DictReader(handle)}


def _check(paths, scores, calibrated, predictions, expected):
    assert sorted(paths) == sorted(expected)
    for path, score, calibrated_score, prediction in zip(paths, scores, calibrated, predictions):
        want = expected[path]
        assert (score, calibrated_score) == pytest.approx(want[:2], abs=1e-6)  # batches differ: float32 rounding
        assert prediction == want[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_data_scores_a_csv_as_predict_does(exportable_run, demo_data, tmp_path):
    import ray

    expected = _predicted(exportable_run, demo_data, tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False)
    try:
        ds = ray.data.read_csv(str(Path(demo_data) / "test.csv"))
        scored = ds.map_batches(BatchScorer, fn_constructor_kwargs={"source": str(exportable_run), "base_dir": str(demo_data)},
                                batch_format="pandas", batch_size=8, concurrency=2,
                                num_cpus=0.5)  # 2 actors on 1 CPU: the other one reads the CSV (else it waits forever)
        frame = scored.to_pandas()
    finally:
        ray.shutdown()
    assert len(frame) == 32
    assert list(frame.columns) == ["local_image_path", "label", "text_info", "score", "calibrated_score", "prediction"]
    _check(frame["local_image_path"].tolist(), frame["score"].tolist(), frame["calibrated_score"].tolist(),
           frame["prediction"].tolist(), expected)


def test_a_batch_comes_back_in_its_own_format_with_the_scores(exported_bundle, demo_data, tmp_path):
    """pyarrow Tables and dicts of numpy arrays (Ray's other batch formats, Spark's columns), a bundle, an empty batch."""
    import pandas as pd
    import pyarrow as pa

    expected = _predicted(exported_bundle, demo_data, tmp_path)
    frame = pd.read_csv(Path(demo_data) / "test.csv", keep_default_na=False, dtype=str)
    scorer = BatchScorer(exported_bundle, base_dir=demo_data, device="cpu")

    table = scorer(pa.Table.from_pandas(frame.iloc[:12], preserve_index=False))
    assert isinstance(table, pa.Table)
    assert [str(t) for t in table.schema.types[-3:]] == ["double", "double", "bool"]
    columns = table.to_pydict()
    _check(columns["local_image_path"], columns["score"], columns["calibrated_score"], columns["prediction"],
           {k: v for k, v in expected.items() if k in set(frame["local_image_path"][:12])})

    batch = {name: frame[name].to_numpy()[12:] for name in ("local_image_path", "text_info")}
    out = scorer(batch)
    assert out["score"].dtype == np.float64 and out["prediction"].dtype == object
    _check(list(out["local_image_path"]), out["score"], out["calibrated_score"], list(out["prediction"]),
           {k: v for k, v in expected.items() if k in set(frame["local_image_path"][12:])})

    empty = scorer(frame.iloc[:0])
    assert list(empty.columns) == [*frame.columns, "score", "calibrated_score", "prediction"] and len(empty) == 0
