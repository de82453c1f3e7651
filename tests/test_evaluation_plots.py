"""The evaluation plots are real, non-blank PNG files."""

import numpy as np
import pytest
from PIL import Image

from mmcore.evaluation import write_plots


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    raw = np.clip(rng.normal(0.3 + 0.4 * labels, 0.25), 0, 1)
    calibrated = np.clip(0.5 + (raw - 0.5) * 0.8, 0, 1)
    return calibrated, raw, labels


HISTORY = [
    {"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_auroc": 0.6 + 0.05 * e, "lr": 1e-3 / e}
    for e in range(1, 6)
]


def assert_real_png(path, min_bytes=10_000):
    assert path.is_file() and path.stat().st_size > min_bytes, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 400 and image.height >= 300
        # a blank or single-colour canvas has very few colours; a labelled plot has many
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 20


def test_writes_every_plot_as_a_real_png(tmp_path, scored):
    scores, raw, labels = scored
    paths = write_plots(tmp_path / "plots", scores=scores, labels=labels, threshold=0.42,
                        history=HISTORY, raw_scores=raw)
    assert set(paths) == {"roc", "pr", "reliability", "score_hist", "confusion", "training_curves"}
    for name, path in paths.items():
        assert path == tmp_path / "plots" / f"{name}.png"
        assert_real_png(path)


def test_training_curves_skipped_without_history(tmp_path, scored):
    scores, _, labels = scored
    paths = write_plots(tmp_path, scores=scores, labels=labels, threshold=0.5)
    assert "training_curves" not in paths
    assert not (tmp_path / "training_curves.png").exists()


def test_single_class_still_plots(tmp_path):
    paths = write_plots(tmp_path, scores=[0.2, 0.7, 0.9], labels=[1, 1, 1], threshold=0.5)
    for path in paths.values():
        assert_real_png(path, min_bytes=5_000)
