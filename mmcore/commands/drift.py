"""``mmcore drift RUN|BUNDLE new.csv``: how far new ads are from the rows a run was checked on.

The run (or its bundle) keeps a reference profile (:mod:`mmcore.quality.profile`), written at the
end of ``mmcore run`` by :func:`write_reference_profile` from its held-out rows (val + test,
scored after the threshold and temperature were chosen) and copied into the bundle by
``mmcore export``. ``drift`` scores ``new.csv`` through the scoring path (calibrated scores, texts
by the text rule), takes each modality's pooled features of the same rows (a run gives them; a
bundle's graph outputs the logit only, so from a bundle the domain AUROC is left out with a
note), reads image sizes from the headers and compares (:func:`mmcore.quality.drift.compare_to_profile`).

Outputs: ``drift.json`` and ``drift.html`` (+ ``drift_files/``) in ``--out``. A drift is a finding,
not an error: the command then exits :data:`~mmcore.quality.drift.DRIFT_EXIT_CODE` (10).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.errors import RunError
from mmcore.kit.deps import require_extra
from mmcore.quality.profile import PROFILE_NAME

#: the scoring path's modality names -> the profile's (its file names derive from them)
PROFILE_MODALITIES = {"vision": "image", "text": "text"}
DRIFT_FILE = "drift.json"
DRIFT_PAGE = "drift.html"


@attrs.frozen(eq=False)
class ScoredRows:
    """Rows scored and embedded: their positions in the input, raw logits, calibrated scores, the
    texts they were scored with, ``{modality: float32 [N, D]}`` (profile names) and notes."""

    positions: np.ndarray
    logits: np.ndarray
    calibrated: np.ndarray
    texts: tuple
    embeddings: dict
    notes: tuple
    bad: tuple


def join_splits(parts):
    """Several splits' rows as one :class:`Split`, in order (the first one's CSV names it; labels
    kept only when every part has them)."""
    labelled = all(p.labels is not None for p in parts)
    return attrs.evolve(
        parts[0],
        paths=sum((p.paths for p in parts), ()),
        texts=sum((p.texts for p in parts), ()),
        labels=sum((p.labels for p in parts), ()) if labelled else None,
        rows=sum((p.rows for p in parts), ()),
        raw_paths=sum((p.raw_paths for p in parts), ()),
        stats=None,
    )


def score_and_embed(scorer, split, *, fill_text=True, registry=None, progress=False, desc=None):
    """Every readable row of ``split`` scored by ``scorer`` and, where it can, embedded per modality.

    One pass of the one row scorer: each batch's pooled features (``Scorer.embed``; texts settled
    by the text rule), and its logits from those features (``Scorer.logits_from_features``), so no
    encoder runs twice. A scorer that gives no features (a bundle) is scored for its logits alone,
    with a note. Unreadable rows are left out (their lines in ``bad``).
    """
    from mmcore.scoring.base import EmbeddingsUnavailable
    from mmcore.scoring.rows import collect, score_rows

    positions, logits, texts, parts, bad = [], [], [], {}, []
    notes = []
    try:
        for batch in score_rows(scorer, split, fill_text=fill_text, on_bad_image="skip", embed=True, registry=registry,
                                progress=progress, desc=desc):
            bad.extend(batch.bad)
            if not len(batch.positions):
                continue
            positions.append(batch.positions)
            texts.extend(batch.texts)
            logits.append(scorer.logits_from_features(batch.embeddings))
            for name, values in batch.embeddings.items():
                parts.setdefault(PROFILE_MODALITIES[name], []).append(values)
        scored_positions = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
        scored_logits = np.concatenate(logits) if logits else np.zeros(0)
    except EmbeddingsUnavailable:
        scored = collect(score_rows(scorer, split, fill_text=fill_text, on_bad_image="skip", registry=registry,
                                    progress=progress, desc=desc))
        scored_positions, scored_logits, texts, bad, parts = scored.positions, scored.logits, list(scored.texts), \
            list(scored.bad), {}
        notes.append(f"a {scorer.kind} gives no per-modality features: the domain AUROC needs a run directory")
    _, calibrated, _ = scorer.decide(scored_logits)
    embeddings = {name: np.concatenate(values).astype(np.float32) for name, values in parts.items()}
    return ScoredRows(positions=scored_positions, logits=scored_logits, calibrated=np.asarray(calibrated),
                      texts=tuple(texts), embeddings=embeddings, notes=tuple(notes), bad=tuple(bad))


def _image_sizes(scorer, split, positions):
    from mmcore.evaluation.explain import image_sizes

    if not scorer.uses_vision:
        return None
    return image_sizes([split.paths[int(i)] for i in positions])


def write_reference_profile(run_dir, run_model, decision, splits, *, seed=0, registry=None, progress=False):
    """``RUN/reference_profile.safetensors`` from the run's held-out rows (val + test) scored by
    ``run_model`` at ``decision``.

    Called by ``mmcore run`` once the run has chosen its epoch, threshold and temperature. Returns
    the file, or None when no held-out row could be read (``mmcore drift`` then says there is no profile).
    """
    from mmcore.quality.profile import build_profile, write_profile
    from mmcore.scoring.run import RunScorer

    scorer = RunScorer.from_model(run_model, decision=decision, source=run_dir)
    held_out = join_splits([splits["val"], splits["test"]])
    rows = score_and_embed(scorer, held_out, fill_text=False, registry=registry, progress=progress, desc="profile")
    if rows.positions.size == 0:  # every held-out image unreadable (data.on_bad_image = "skip"): nothing to profile
        return None
    profile = build_profile(rows.calibrated, float(scorer.decision["threshold"]), rows.texts, rows.embeddings,
                            image_sizes=_image_sizes(scorer, held_out, rows.positions), seed=seed)
    return write_profile(Path(run_dir) / PROFILE_NAME, profile)


def reference_profile(source):
    """The checked :class:`~mmcore.quality.profile.ReferenceProfile` of a run directory or a bundle
    (its ``reference_profile.safetensors``, or the ``reference_profile/`` folder of an older one).

    A bundle's profile must be listed in its manifest, every file of it (so their sizes were checked
    with the bundle's, and their digests are checked when the bundle is opened).
    """
    from mmcore.export.bundle import is_bundle, read_manifest
    from mmcore.quality.profile import PROFILE_DIR, PROFILE_FILE, folder_files, profile_path, read_profile

    source = Path(source)
    path = profile_path(source)
    if not is_bundle(source):
        return read_profile(path)
    listed = read_manifest(source, verify=False).files
    older = path.name == PROFILE_DIR
    _require_listed(source, [f"{PROFILE_DIR}/{PROFILE_FILE}" if older else PROFILE_NAME], listed)
    profile = read_profile(path)
    if older:  # its arrays: which there are is known once profile.json is read
        _require_listed(source, [f"{PROFILE_DIR}/{name}" for name in folder_files(profile)], listed)
    return profile


def _require_listed(bundle, names, listed):
    """Refuse, in one line, a profile file of ``bundle`` that its manifest does not list."""
    from mmcore.export.bundle import MANIFEST

    for name in names:
        if name not in listed:
            raise RunError(f"{bundle / name}: not listed in the bundle's {MANIFEST}; export the run again "
                           "(mmcore export copies its reference profile)")


def _scorer_and_rows(source, new_csv, *, base_dir, device, registry, progress, echo):
    """The scorer of ``source`` and the validated rows of ``new_csv`` (a run's rows read before its model is built)."""
    from mmcore.export.bundle import is_bundle
    from mmcore.scoring.tables import read_input

    scorer = run_dir = None
    if is_bundle(source):
        from mmcore.scoring.bundle import BundleScorer

        scorer = BundleScorer(source, device=device, registry=registry)
        recipe_data = scorer.recipe_data
    else:
        from mmcore.engine.restore import open_run

        run_dir = open_run(source, echo=echo)
        recipe_data = run_dir.recipe_data()
    modality = (recipe_data.get("train") or {}).get("modality", "multimodal")
    max_bytes = (recipe_data.get("data") or {}).get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES)
    _, split = read_input(new_csv, base_dir, require_text=modality != "vision_only", check_images=modality != "text_only",
                          max_image_bytes=max_bytes)
    if scorer is None:
        from mmcore.scoring.run import RunScorer

        scorer = RunScorer(run_dir, device=device, registry=registry, progress=progress)
    return scorer, split


def drift(source, new_csv, *, out=None, max_domain_auroc=0.75, max_psi=0.25, seed=0, base_dir=None, device="auto",
          registry=None, progress=True, echo=print):
    """Compare ``new_csv`` with the reference profile of the run or bundle ``source``; write
    ``drift.json`` and ``drift.html`` into ``out`` (default ``<source>/drift``) -> the
    :class:`~mmcore.quality.drift.DriftReport` (its ``exit_code``: 0, or 10 for drift)."""
    from mmcore.devices import parse_device
    from mmcore.io import check_output_path
    from mmcore.quality.drift import DriftRule, compare_to_profile
    from mmcore.quality.drift_page import write_drift_page
    from mmcore.rundir import make_directory

    require_extra("quality", "mmcore drift")  # the domain classifier (scikit-learn) and KS (scipy), before any scoring
    source, new_csv = Path(source), Path(new_csv)
    out = Path(out) if out is not None else source / "drift"
    check_output_path(out / DRIFT_FILE, "drift report", option="--out")
    profile = reference_profile(source)  # a missing or damaged profile before any scoring
    rule = DriftRule(domain_auroc=max_domain_auroc, psi=max_psi)
    scorer, split = _scorer_and_rows(source, new_csv, base_dir=base_dir, device=parse_device(device), registry=registry,
                                     progress=progress, echo=echo)
    rows = score_and_embed(scorer, split, registry=registry, progress=progress, desc=f"drift {new_csv.name}")
    if rows.positions.size == 0:
        raise RunError(f"{new_csv}: no row could be scored (every image unreadable)")
    report = compare_to_profile(profile, scores=rows.calibrated, texts=rows.texts, embeddings=rows.embeddings,
                                image_sizes=_image_sizes(scorer, split, rows.positions), rule=rule, seed=seed)
    if rows.notes or rows.bad:
        report = attrs.evolve(report, notes=report.notes + rows.notes
                              + ((f"{len(rows.bad)} rows left out: unreadable images",) if rows.bad else ()))
    make_directory(out, "drift folder")
    report.write(out / DRIFT_FILE)
    write_drift_page(out / DRIFT_PAGE, report, title=f"Drift: {new_csv.name} against {source.name}")
    measures = ", ".join(f"{m} domain AUROC {v['auroc']:.3f}" for m, v in report.domain_auroc.items())
    echo(f"{report.new_rows} new rows against {report.reference_rows} reference rows: "
         f"{measures + ', ' if measures else ''}score PSI {report.score['psi']:.3f} ({report.score['psi_band']})")
    echo(f"drift: {'; '.join(report.reasons)}" if report.drift else "no drift")
    echo(f"wrote {out / DRIFT_FILE} and {out / DRIFT_PAGE}")
    return report
