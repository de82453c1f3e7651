"""Know your data, from arrays: suspect labels, near duplicates, label noise per slice, what to
label next, drift against a reference profile, and the audit and drift pages.

Pure functions on scores, labels, embeddings, texts and slices; ``mmcore audit``, ``select`` and
``drift`` (see ``docs/data-quality.md``) feed them from a run, its feature cache and its bundle.
cleanlab, scikit-learn and scipy (the ``quality`` extra) are imported inside the functions that
use them, so importing this package costs nothing.
"""

from mmcore.quality.drift import DRIFT_EXIT_CODE, DriftReport, DriftRule, compare_to_profile, domain_auroc, ks, psi
from mmcore.quality.duplicates import DuplicatePair, DuplicateSearch, duplicate_groups, near_duplicate_pairs
from mmcore.quality.label_issues import LabelIssue, LabelIssues, find_label_issues, fixed_labels, write_label_issues_csv
from mmcore.quality.noise import label_noise_by_slice, wilson_interval
from mmcore.quality.profile import ReferenceProfile, build_profile, read_profile, score_histogram, write_profile
from mmcore.quality.selection import Selected, select_rows

__all__ = [
    "DRIFT_EXIT_CODE",
    "DriftReport",
    "DriftRule",
    "DuplicatePair",
    "DuplicateSearch",
    "LabelIssue",
    "LabelIssues",
    "ReferenceProfile",
    "Selected",
    "build_profile",
    "compare_to_profile",
    "domain_auroc",
    "duplicate_groups",
    "find_label_issues",
    "fixed_labels",
    "ks",
    "label_noise_by_slice",
    "near_duplicate_pairs",
    "psi",
    "read_profile",
    "score_histogram",
    "select_rows",
    "wilson_interval",
    "write_label_issues_csv",
    "write_profile",
]
