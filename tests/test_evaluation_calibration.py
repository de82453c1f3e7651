"""Temperature scaling recovers the over-confidence factor of a deliberately sharpened model."""

import numpy as np
import pytest

from mmcore.evaluation import apply_temperature, binary_metrics, fit_temperature
from mmcore.evaluation.calibration import nll


@pytest.fixture(scope="module")
def calibrated_logits():
    # labels drawn from sigmoid(z): z are the logits of a perfectly calibrated model
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 20000)
    labels = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    return z, labels


def test_recovers_temperature_of_overconfident_model(calibrated_logits):
    z, labels = calibrated_logits
    overconfident = 5 * z
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(5.0, rel=0.08)
    assert nll(overconfident, labels, temperature) < nll(overconfident, labels) - 0.1


def test_calibrated_model_keeps_temperature_near_one(calibrated_logits):
    assert fit_temperature(*calibrated_logits) == pytest.approx(1.0, abs=0.08)


def test_calibration_lowers_ece_and_keeps_auroc(calibrated_logits):
    z, labels = calibrated_logits
    overconfident = 5 * z
    raw = apply_temperature(overconfident, 1.0)
    calibrated = apply_temperature(overconfident, fit_temperature(overconfident, labels))
    before, after = binary_metrics(raw, labels), binary_metrics(calibrated, labels)
    assert after["ece"] < before["ece"] / 3
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-6)


def test_apply_temperature_is_sigmoid_of_scaled_logits():
    logits = np.array([-800.0, -2.0, 0.0, 3.0, 800.0])
    got = apply_temperature(logits, 2.0)
    assert got == pytest.approx(1 / (1 + np.exp(-logits / 2.0)))
    assert np.all(np.isfinite(got))


def test_single_class_keeps_temperature_one():
    assert fit_temperature([1.0, 2.0, 3.0], [1, 1, 1]) == 1.0


def test_temperature_is_positive_even_for_anti_correlated_logits():
    # the best fit would flip the sign; T > 0 cannot, so it flattens towards 0.5 instead
    temperature = fit_temperature([3.0, -3.0, 2.0, -2.0], [0, 1, 0, 1])
    assert temperature > 1.0


def test_bad_temperature_is_an_error():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature([0.0], 0)


def test_the_engines_sigmoid_is_exact_and_silent_for_extreme_logits():
    import warnings

    from mmcore.engine.inference import sigmoid

    # a pruned tuning trial's diverged head gives logits of -1e4: no overflow warning, exact 0 and 1
    logits = np.array([-1e4, -800.0, -2.0, 0.0, 3.0, 800.0, 1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sigmoid(logits)
    assert got[1:-1] == pytest.approx([0.0, 1 / (1 + np.exp(2.0)), 0.5, 1 / (1 + np.exp(-3.0)), 1.0], abs=1e-300)
    assert got[0] == 0.0 and got[-1] == 1.0 and got.dtype == np.float64
    assert float(sigmoid(0.0)) == 0.5
