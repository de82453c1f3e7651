"""``mmcore audit RECIPE|RUN|BAG``: suspect labels, near duplicates and label noise per slice.

Out-of-fold scores for every labelled row (train + val) come, in this order, from:

1. a k-fold bag's ``oof_scores.csv`` (a folder :func:`mmcore.commands.kfold.train_folds` wrote):
   read with :func:`mmcore.evaluation.oof.read_oof_scores` (every line checked) and matched
   against the recipe's rows, not recomputed;
2. otherwise k-fold training of the recipe (a RUN's ``recipe.toml``, or the RECIPE) into
   ``<out>/kfold/``: the one k-fold mechanism, members trained on cached frozen-encoder features;
3. a recipe that fine-tunes an encoder is audited through frozen-backbone heads (the same
   encoders frozen at their pretrained weights): its in-sample fit would hide the flips it memorised.

Then cleanlab (:func:`mmcore.quality.label_issues.find_label_issues`), near-duplicate pairs of the
image embeddings of train + val + test (member 0's pooled features), and label noise per slice.
Issues are findings, not failures: exit 0. ``--fix drop|relabel --out cleaned/`` writes cleaned
train and val CSVs and never touches the inputs.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import attrs

from mmcore.commands.drift import join_splits, score_and_embed
from mmcore.commands.kfold import labelled_rows, train_folds
from mmcore.data.csvs import read_table, resolve_csv
from mmcore.data.memo import ImageHashes
from mmcore.errors import MmcoreError, RecipeError, RunError
from mmcore.evaluation.oof import OOF_FILE, read_oof_scores
from mmcore.io import write_json, write_text
from mmcore.kit.deps import require_extra
from mmcore.rundir import RECIPE_FILE, RunDir, make_directory

AUDIT_DIR = "audit"
KFOLD_DIR = "kfold"
ISSUES_FILE = "label_issues.csv"
DUPLICATES_FILE = "near_duplicates.csv"
NOISE_FILE = "label_noise.json"
SUMMARY_FILE = "summary.json"
PAGE_FILE = "report.html"
FIXES = ("drop", "relabel")
_FLIPPED = {"1": "0", "0": "1", "1.0": "0.0", "0.0": "1.0"}


@attrs.frozen(eq=False)
class AuditResult:
    """What :func:`audit` wrote (``out``) and found."""

    out: Path
    issues: object  # LabelIssues
    duplicates: object  # DuplicateSearch, or None when no image embeddings were there
    summary: dict
    cleaned: tuple[Path, ...] = ()


def frozen_recipe(recipe):
    """``(recipe with every encoder frozen, note)``; the note is None when the recipe trained frozen already."""
    train = recipe.train
    tuned = []
    if not train.freeze_backbone or train.finetune_layers != 0:
        tuned.append("fine-tunes its encoders")
    if train.lora.enabled:
        tuned.append("adapts them with LoRA")
    if not tuned:
        return recipe, None
    frozen = attrs.evolve(train, freeze_backbone=True, finetune_layers=0, lora=attrs.evolve(train.lora, enabled=False))
    return attrs.evolve(recipe, train=frozen), f"frozen-backbone heads: the recipe {' and '.join(tuned)}"


def _source(source, registry):
    """``(recipe, recipe path, kind, folder)``: what ``source`` is (a recipe file, a bag, a run directory)."""
    from mmcore.recipe import load_recipe

    source = Path(source)
    if source.is_file():
        return load_recipe(source, registry=registry), source, "recipe", None
    if not (source / RECIPE_FILE).is_file():
        raise RunError(f"{source}: neither a recipe file nor a run directory or k-fold bag (no {RECIPE_FILE})")
    run = RunDir(source)
    kind = "bag" if (source / OOF_FILE).is_file() else "run"
    return run.load_recipe(registry), run.recipe_file, kind, source


def _check_fix(fix, fix_out, recipe):
    """``--fix`` and ``--out`` together, never over an input CSV (checked before any training)."""
    if fix is None and fix_out is None:
        return None
    if fix is None or fix_out is None:
        raise MmcoreError("--fix and --out go together: --fix drop|relabel --out cleaned/")
    if fix not in FIXES:
        raise MmcoreError(f"--fix {fix}: choose one of {', '.join(FIXES)}")
    fix_out = Path(fix_out)
    inputs = {resolve_csv(getattr(recipe.data, name), recipe.data.base_dir).resolve() for name in ("train", "val", "test")}
    for name in ("train.csv", "val.csv"):
        if (fix_out / name).resolve() in inputs:
            raise MmcoreError(f"--out {fix_out}: {name} there is an input CSV of the recipe; write the cleaned CSVs elsewhere")
    return fix_out


def _out_dir(out_dir, kind, folder, recipe_path):
    if out_dir is None:
        out_dir = folder / AUDIT_DIR if folder is not None else Path(AUDIT_DIR) / Path(recipe_path).stem
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RunError(f"{out_dir}: exists and is not an empty folder; give the audit a new --out-dir")
    return make_directory(out_dir, "audit folder")


def _bag_scores(folder, rows):
    """A bag's ``oof_scores.csv``, checked row by row against the recipe's train + val rows."""
    table = read_oof_scores(folder / OOF_FILE)
    path = folder / OOF_FILE
    if table.oof.labels.size != len(rows.split):
        raise RunError(f"{path}: {table.oof.labels.size} rows, the recipe's train + val have {len(rows.split)}")
    for i, (image, label) in enumerate(zip(table.image, table.oof.labels)):
        if image != rows.split.raw_paths[i] or int(label) != rows.split.labels[i]:
            raise RunError(f"{path}: line {i + 2}: {image} labelled {int(label)}, the recipe's row {rows.csv_names[i]}:"
                           f"{rows.split.rows[i]} is {rows.split.raw_paths[i]} labelled {rows.split.labels[i]}")
    members = sorted((folder / "members").glob("fold-*")) if (folder / "members").is_dir() else []
    return table.oof, [m for m in members if (m / RECIPE_FILE).is_file()]


@attrs.frozen(eq=False)
class Duplicates:
    """Near-duplicate pairs and, for each position they name, its row id, file as written, path and text."""

    search: object  # DuplicateSearch
    row_ids: list
    files: list
    paths: list
    texts: list


def _duplicates(member, recipe, rows, threshold, *, registry, progress):
    """Near-duplicate pairs among train + val + test by member ``member``'s pooled image features (None: no images)."""
    from mmcore.data.csvs import load_splits
    from mmcore.quality.duplicates import near_duplicate_pairs
    from mmcore.scoring.run import RunScorer

    scorer = RunScorer(member, registry=registry)
    if not scorer.uses_vision:
        return None
    test = load_splits(recipe.data, names=("test",), cache=recipe.cache)["test"]
    everything = join_splits([rows.split, test])
    csv_names = [*rows.csv_names, *[recipe.data.test] * len(test)]
    splits = ["train" if name == recipe.data.train else "val" for name in rows.csv_names] + ["test"] * len(test)
    scored = score_and_embed(scorer, everything, fill_text=False, registry=registry, progress=progress,
                             desc="duplicates")
    kept = [int(i) for i in scored.positions]
    paths = [str(everything.paths[i]) for i in kept]
    search = near_duplicate_pairs(scored.embeddings["image"], [splits[i] for i in kept], threshold=threshold,
                                  hashes=ImageHashes.for_recipe(recipe)(paths))
    return Duplicates(search=search, row_ids=[f"{csv_names[i]}:{everything.rows[i]}" for i in kept],
                      files=[everything.raw_paths[i] for i in kept], paths=paths, texts=[everything.texts[i] for i in kept])


def _flipped(value):
    """The other label in ``value``'s own spelling (``True``/``False``, ``true``, ``TRUE``, ``1``/``0``, ``1.0``)."""
    text = str(value).strip()
    if text in _FLIPPED:
        return _FLIPPED[text]
    other = "false" if text.lower() == "true" else "true"
    if text.isupper():
        return other.upper()
    return other.capitalize() if text[:1].isupper() else other


def _line_ending(path):
    with open(path, "rb") as handle:
        return "\r\n" if handle.readline().endswith(b"\r\n") else "\n"


def write_cleaned(recipe, rows, keep, labels, fix_out):
    """``fix_out/train.csv`` and ``fix_out/val.csv``: the inputs' columns and order, flagged rows dropped or relabelled."""
    make_directory(fix_out, "cleaned CSV folder")
    written, start = [], 0
    for name in ("train", "val"):
        path = resolve_csv(getattr(recipe.data, name), recipe.data.base_dir)
        frame = read_table(path)
        n = len(frame)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator=_line_ending(path))
        writer.writerow(list(frame.columns))
        for i, values in enumerate(frame.itertuples(index=False, name=None)):
            position = start + i
            if not keep[position]:
                continue
            values = list(values)
            if labels[position] != rows.split.labels[position]:
                column = list(frame.columns).index("label")
                values[column] = _flipped(values[column])
            writer.writerow(values)
        written.append(write_text(fix_out / f"{name}.csv", buffer.getvalue()))
        start += n
    return tuple(written)


def audit(source, *, folds=5, seed=0, duplicates=0.95, out_dir=None, fix=None, fix_out=None, group_column=None,
          registry=None, progress=True, echo=print):
    """Audit the labels of a recipe, a run or a k-fold bag (see the module docstring) -> :class:`AuditResult`."""
    from mmcore.evaluation.explain import image_sizes, slice_keys
    from mmcore.quality.audit_page import write_audit_page
    from mmcore.quality.duplicates import write_near_duplicates_csv
    from mmcore.quality.label_issues import find_label_issues, fixed_labels, platt_scores, write_label_issues_csv
    from mmcore.quality.noise import label_noise_by_slice

    require_extra("quality", "mmcore audit")  # cleanlab and scikit-learn, before any training
    if not 0.0 < duplicates <= 1.0:
        raise RecipeError(f"--duplicates {duplicates}: a cosine similarity in (0, 1]")
    recipe, recipe_path, kind, folder = _source(source, registry)
    fix_out = _check_fix(fix, fix_out, recipe)
    rows = labelled_rows(recipe)
    notes = []
    out = _out_dir(out_dir, kind, folder, recipe_path)
    if kind == "bag":
        oof, members = _bag_scores(folder, rows)
        origin, k = OOF_FILE, int(oof.folds.max()) + 1
    else:
        recipe, frozen_note = frozen_recipe(recipe)
        if frozen_note:
            notes.append(frozen_note)
            echo(frozen_note)
        runs = train_folds(recipe, k=folds, out=out / KFOLD_DIR, seed=seed, group_column=group_column, registry=registry,
                           progress=progress, echo=echo, recipe_path=recipe_path)
        oof, members, k = runs.oof, list(runs.members), folds
        origin = "frozen-backbone heads" if frozen_note else "k-fold heads"
    row_ids = [f"{name}:{row}" for name, row in zip(rows.csv_names, rows.split.rows)]
    # Platt-scaled: the two classes' confidences comparable whatever the loss did to the raw probabilities
    issues = find_label_issues(platt_scores(oof.logits, rows.labels), rows.labels, row_ids=row_ids,
                               files=rows.split.raw_paths)
    write_label_issues_csv(out / ISSUES_FILE, issues)

    duplicates_found = None
    if not members:
        notes.append("the bag keeps no member runs: near duplicates not searched")
    else:
        duplicates_found = _duplicates(members[0], recipe, rows, duplicates, registry=registry, progress=progress)
        if duplicates_found is None:
            notes.append("no image embeddings (a text_only recipe): near duplicates not searched")
        else:
            write_near_duplicates_csv(out / DUPLICATES_FILE, duplicates_found.search, row_ids=duplicates_found.row_ids,
                                      files=duplicates_found.files)
    search = duplicates_found.search if duplicates_found else None
    texts = rows.split.texts
    sizes = image_sizes(rows.split.paths) if recipe.train.modality != "text_only" else None
    noise = label_noise_by_slice(issues.mask(), slice_keys(texts, sizes))
    write_json(out / NOISE_FILE, noise)
    summary = {
        "rows": len(issues.rows), "flagged": issues.flagged, "folds": k, "seed": seed, "scores": origin,
        "duplicate_threshold": duplicates,
        "duplicate_pairs": {"found": search.found, "kept": len(search.pairs),
                            "across_splits": sum(p.cross_split for p in search.pairs)} if search else None,
        "notes": notes,
    }
    write_json(out / SUMMARY_FILE, summary)
    base = Path(recipe.data.base_dir) if recipe.data.base_dir else resolve_csv(recipe.data.train, None).parent
    write_audit_page(out / PAGE_FILE, issues=issues, texts=texts, duplicates=search,
                     duplicate_files=duplicates_found.paths if search else None,
                     duplicate_texts=duplicates_found.texts if search else None,
                     noise=noise, image_root=base, notes=notes, title=f"Label audit: {Path(recipe_path).name}")
    cleaned = ()
    if fix_out is not None:
        keep, labels = fixed_labels(issues, fix)
        cleaned = write_cleaned(recipe, rows, keep, labels, fix_out)
    pairs = f"{search.found} near-duplicate pairs ({summary['duplicate_pairs']['across_splits']} across splits)" if search \
        else "near duplicates not searched"
    echo(f"audited {len(issues.rows)} labelled rows ({origin}, {k} folds): {issues.flagged} flagged; {pairs}")
    echo(f"wrote {out / ISSUES_FILE} and {out / PAGE_FILE}")
    if cleaned:
        echo(f"wrote {' and '.join(str(p) for p in cleaned)} (--fix {fix}; the inputs are unchanged)")
    return AuditResult(out=out, issues=issues, duplicates=search, summary=summary, cleaned=cleaned)
