"""A path -> the scorer of what is there: :func:`open_scorer`."""

from __future__ import annotations

from pathlib import Path

from mmcore.errors import RunError
from mmcore.export.bundle import is_bundle
from mmcore.scoring.ensemble_dir import is_ensemble


def open_scorer(path, *, registry=None, device="auto", verify=None, progress=False):
    """A :class:`~mmcore.scoring.bundle.BundleScorer` for a bundle folder, an
    :class:`~mmcore.scoring.ensemble.EnsembleScorer` for an ensemble directory, else a
    :class:`~mmcore.scoring.run.RunScorer` for a run directory (finished, or live: its last
    completed checkpoint).

    ``device``: ``auto``/``cpu``/``cuda[:N]``; ``verify`` (bundles): True hashes every file.

    Each kind's scorer is imported when a path of that kind is opened: a bundle's process never
    imports the PyTorch model code (the engine, the plugins) that a run or an ensemble needs.
    """
    path = Path(path)
    if is_bundle(path):
        from mmcore.scoring.bundle import BundleScorer

        return BundleScorer(path, device=device, verify=verify, registry=registry)
    if is_ensemble(path):
        from mmcore.scoring.ensemble import EnsembleScorer

        return EnsembleScorer(path, registry=registry, device=device, verify=verify, progress=progress)
    if not path.is_dir():
        raise RunError(f"{path}: neither a run directory nor an export bundle (not found)")
    from mmcore.scoring.run import RunScorer

    return RunScorer(path, registry=registry, device=device, progress=progress)
