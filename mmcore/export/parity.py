"""The parity gate: an exported bundle must score real rows as the PyTorch run does.

Both sides score the same rows through the one scoring path (:func:`mmcore.scoring.rows.score_rows`,
the code path of ``mmcore eval`` and ``predict``), from the raw image files and texts: the run by
:class:`~mmcore.scoring.run.RunScorer` in float32 whatever precision it trained in, the bundle by
:class:`~mmcore.scoring.bundle.BundleScorer` (onnxruntime, float32). The figures go to
``parity.json``; beyond tolerance the export fails with one line naming the worst row. How far
the run's own training precision (bf16 autocast on a GPU) is from float32 is measured too, and
reported beside the gate as information (:func:`precision_deviation`): it never decides.
"""

from __future__ import annotations

import attrs
import numpy as np

from mmcore.errors import RunError

#: default tolerance on |Δ score| (raw and calibrated): both sides compute in float32
FP32_SCORE_TOL = 1e-4


class ParityError(RunError):
    """The bundle disagrees with the run beyond tolerance (the message is the one line)."""


@attrs.frozen
class ParityReport:
    """What the gate measured on ``rows`` rows, and whether it passed."""

    rows: int
    max_abs_logit: float
    max_abs_score: float
    max_abs_calibrated: float
    agreement: float
    worst_row: int
    worst_path: str
    worst_torch: float
    worst_bundle: float
    score_tol: float
    min_agreement: float
    threshold: float
    csv: str
    #: rows whose PyTorch score is within the score tolerance of the threshold (left out of the agreement)
    borderline: int = 0

    @property
    def passed(self):
        return self.max_abs_score <= self.score_tol and self.max_abs_calibrated <= self.score_tol and (
            self.agreement >= self.min_agreement
        )

    def as_dict(self):
        """``parity.json``'s content."""
        return {
            "passed": self.passed,
            "rows_compared": self.rows,
            "data": self.csv,
            "max_abs_logit_diff": self.max_abs_logit,
            "max_abs_score_diff": self.max_abs_score,
            "max_abs_calibrated_score_diff": self.max_abs_calibrated,
            "decision_agreement": self.agreement,
            "borderline_rows": self.borderline,
            "threshold": self.threshold,
            "tolerance": {"score": self.score_tol, "agreement": self.min_agreement},
            "worst": {"row": self.worst_row, "path": self.worst_path,
                      "torch_calibrated_score": self.worst_torch, "bundle_calibrated_score": self.worst_bundle},
        }

    def failure_line(self, out):
        """The one line the export fails with."""
        if self.agreement < self.min_agreement:
            what = f"decision agreement {self.agreement:.4f} < {self.min_agreement:g}"
        else:
            what = f"max |Δ calibrated score| {max(self.max_abs_score, self.max_abs_calibrated):.3g} > {self.score_tol:g}"
        return (
            f"{out}: parity gate failed on {self.rows} rows: {what}; worst: {self.csv} row {self.worst_row} "
            f"({self.worst_path}): PyTorch {self.worst_torch:.6f}, bundle {self.worst_bundle:.6f}; no bundle written"
        )


def compare(scorer, split, torch_logits, *, score_tol, min_agreement, batch_size=16):
    """Score ``split``'s rows through ``scorer`` (a bundle) and compare with ``torch_logits`` (same order).

    ``split``: the rows the run scored, with the texts it scored them with (none is read again).
    """
    from mmcore.scoring.rows import collect, score_rows

    scored = collect(score_rows(scorer, split, batch_size=batch_size, fill_text=False, on_bad_image="skip"))
    if len(scored.positions) != len(split):
        raise RunError(f"{split.csv}: the bundle could not read {scored.skipped} image(s) the run read: {scored.bad[0]}")
    bundle_logits = scored.logits
    torch_logits = np.asarray(torch_logits, dtype=np.float64)
    raw_t, cal_t, dec_t = scorer.decide(torch_logits)
    raw_b, cal_b, dec_b = scorer.decide(bundle_logits)
    d_cal = np.abs(cal_t - cal_b)
    # The tuned threshold is one of the validation scores, so some row may sit on it: a decision
    # there flips on float noise. Agreement counts the rows farther than the tolerance from it.
    threshold = float(scorer.decision["threshold"])
    decided = np.abs(cal_t - threshold) > score_tol
    disagree = (dec_t != dec_b) & decided
    worst = int(np.argmax(d_cal)) if len(d_cal) else 0
    if disagree.any():
        worst = int(np.flatnonzero(disagree)[0])
    return ParityReport(
        rows=len(split),
        max_abs_logit=float(np.max(np.abs(torch_logits - bundle_logits))) if len(split) else 0.0,
        max_abs_score=float(np.max(np.abs(raw_t - raw_b))) if len(split) else 0.0,
        max_abs_calibrated=float(d_cal.max()) if len(split) else 0.0,
        agreement=float(1.0 - disagree.sum() / max(1, decided.sum())) if len(split) else 1.0,
        worst_row=int(split.rows[worst]) if len(split) else 0,
        worst_path=str(split.raw_paths[worst]) if len(split) else "",
        worst_torch=float(cal_t[worst]) if len(split) else 0.0,
        worst_bundle=float(cal_b[worst]) if len(split) else 0.0,
        score_tol=float(score_tol),
        min_agreement=float(min_agreement),
        threshold=threshold,
        csv=str(split.csv),
        borderline=int((~decided).sum()),
    )


def precision_deviation(scorer, fp32_logits, trained_logits, *, precision):
    """How the run scores the same rows under its training precision (``bf16``) against float32:
    ``parity.json``'s ``trained_precision_deviation`` (information; the gate compares float32 with the bundle)."""
    _, cal_fp32, dec_fp32 = scorer.decide(fp32_logits)
    _, cal_trained, dec_trained = scorer.decide(trained_logits)
    return {
        "precision": precision,
        "rows": int(len(cal_fp32)),
        "max_abs_calibrated_score_diff": float(np.max(np.abs(cal_fp32 - cal_trained))) if len(cal_fp32) else 0.0,
        "decisions_that_differ": int(np.sum(dec_fp32 != dec_trained)),
        "note": f"the run scored in {precision} against float32; information only, the bundle computes in float32",
    }
