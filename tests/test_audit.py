"""``mmcore audit``: flipped labels of a tiny dataset ranked first from out-of-fold scores, its files and
page, ``--fix`` writing cleaned CSVs in the inputs' spelling while the inputs stay byte-identical, a
bag's oof_scores.csv read instead of recomputed, and every user mistake one line."""

import csv
import shutil

import numpy as np
import pytest
import tomli_w
from click.testing import CliRunner
from PIL import Image
from tiny import tiny_recipe_data

from mmcore.commands.audit import audit, write_cleaned
from mmcore.commands.kfold import labelled_rows
from mmcore.errors import MmcoreError, RunError
from mmcore.quality.label_issues import LABEL_ISSUE_COLUMNS, fixed_labels

ADS = ["MEGA SALE 50% OFF shop now", "BUY 1 GET 1 free shipping", "HOT PRICE phones $9.99 order today",
       "BLACK FRIDAY laptops click here", "CLEARANCE shoes visit our store"]
PHOTOS = ["my dog in the park", "family trip to the beach", "grandma's garden", "sunset over the hills",
          "wedding photo of my sister"]
FLIPPED_TRAIN_ROWS = (3, 10, 22, 35)  # CSV rows (from 1) whose label the fixture flips


def _write(path, rows, header=("local_image_path", "label", "text_info")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def flipped(tmp_path_factory, registry):
    """An easy tiny dataset (ads: warm images and ad copy; photos: cool images and captions) with four train
    labels flipped; one test image is a byte copy of train row 1's image. Audited with --fix relabel."""
    root = tmp_path_factory.mktemp("audit")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 48), ("val", 24), ("test", 16)):
        rows = []
        for i in range(n):
            ad = i % 2 == 0
            base = np.array([220, 90, 40] if ad else [40, 110, 220], dtype=np.int16)
            pixels = np.clip(base + rng.integers(-40, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            file = f"images/{name}_{i}.png"
            Image.fromarray(pixels).save(data / file)
            rows.append([file, "True" if ad else "False", (ADS if ad else PHOTOS)[int(rng.integers(5))]])
        splits[name] = rows
    for row in FLIPPED_TRAIN_ROWS:
        label = splits["train"][row - 1][1]
        splits["train"][row - 1][1] = "False" if label == "True" else "True"
    shutil.copyfile(data / "images/train_0.png", data / "images/copy.png")
    splits["test"][0][0] = "images/copy.png"
    for name, rows in splits.items():
        _write(data / f"{name}.csv", rows)
    recipe = root / "easy.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_data(
        data, cache={"dir": str(root / "cache")}, logging={"tensorboard": False},
        loss={"name": "bce"}, train={"epochs": 20, "learning_rate": 0.03}, eval={"calibrate": False},
    )), encoding="utf-8")
    inputs = {name: (data / f"{name}.csv").read_bytes() for name in splits}
    lines = []
    result = audit(recipe, folds=3, duplicates=0.999, out_dir=root / "audit", fix="relabel", fix_out=root / "cleaned",
                   registry=registry, progress=False, echo=lines.append)
    return {"root": root, "data": data, "recipe": recipe, "result": result, "inputs": inputs, "lines": lines}


def _csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_flipped_labels_are_ranked_first(flipped):
    result = flipped["result"]
    top = [issue.row for issue in result.issues.rows[:len(FLIPPED_TRAIN_ROWS)]]
    assert sorted(top) == sorted(f"train.csv:{row}" for row in FLIPPED_TRAIN_ROWS)
    assert all(issue.is_issue and issue.suggested_label != issue.given_label for issue in result.issues.rows[:4])
    table = _csv(flipped["root"] / "audit" / "label_issues.csv")
    assert tuple(table[0]) == LABEL_ISSUE_COLUMNS and len(table) == 72
    assert [row["row"] for row in table[:4]] == top and [int(row["rank"]) for row in table] == list(range(1, 73))
    assert table[0]["file"] == f"images/train_{int(top[0].split(':')[1]) - 1}.png"  # as the CSV writes it
    assert result.summary["scores"] == "k-fold heads" and result.summary["folds"] == 3
    assert flipped["lines"][-3].startswith(f"audited 72 labelled rows (k-fold heads, 3 folds): {result.issues.flagged} flagged; ")


def test_near_duplicates_and_noise_files(flipped):
    out = flipped["root"] / "audit"
    pairs = _csv(out / "near_duplicates.csv")
    exact = [p for p in pairs if p["exact"] == "1"]
    assert [(p["first_row"], p["first_split"], p["second_row"], p["second_split"]) for p in exact] == [
        ("train.csv:1", "train", "test.csv:1", "test")]
    assert float(exact[0]["similarity"]) == pytest.approx(1.0, abs=1e-5)
    assert flipped["result"].summary["duplicate_pairs"]["kept"] == len(pairs)
    import json

    noise = json.loads((out / "label_noise.json").read_text())
    assert sum(s["n"] for s in noise["text"]) == 72
    assert sum(s["issues"] for s in noise["text"]) == flipped["result"].issues.flagged


def test_fix_writes_cleaned_csvs_and_never_touches_the_inputs(flipped):
    data, root, result = flipped["data"], flipped["root"], flipped["result"]
    for name, content in flipped["inputs"].items():
        assert (data / f"{name}.csv").read_bytes() == content
    assert not (root / "cleaned" / "test.csv").exists()
    flagged = {issue.row for issue in result.issues.rows if issue.is_issue}
    for name in ("train", "val"):
        given, cleaned = _csv(data / f"{name}.csv"), _csv(root / "cleaned" / f"{name}.csv")
        assert len(cleaned) == len(given)
        for i, (a, b) in enumerate(zip(given, cleaned), start=1):
            assert (a["local_image_path"], a["text_info"]) == (b["local_image_path"], b["text_info"])
            other = {"True": "False", "False": "True"}[a["label"]]
            assert b["label"] == (other if f"{name}.csv:{i}" in flagged else a["label"])
    for row in FLIPPED_TRAIN_ROWS:  # relabelled back to the truth
        assert _csv(root / "cleaned" / "train.csv")[row - 1]["label"] == ("True" if (row - 1) % 2 == 0 else "False")

    from mmcore.recipe import load_recipe

    recipe = load_recipe(flipped["recipe"])
    keep, labels = fixed_labels(result.issues, "drop")
    write_cleaned(recipe, labelled_rows(recipe), keep, labels, root / "dropped")
    kept = _csv(root / "dropped" / "train.csv") + _csv(root / "dropped" / "val.csv")
    assert len(kept) == 72 - result.issues.flagged


def test_a_bags_oof_scores_are_read_not_recomputed(flipped, registry, tmp_path):
    bag = flipped["root"] / "audit" / "kfold"
    members = sorted(p.name for p in (bag / "members").iterdir())
    again = audit(bag, out_dir=tmp_path / "again", registry=registry, progress=False, echo=lambda line: None)
    assert again.summary["scores"] == "oof_scores.csv"
    assert [i.row for i in again.issues.rows] == [i.row for i in flipped["result"].issues.rows]
    assert sorted(p.name for p in (bag / "members").iterdir()) == members and not (tmp_path / "again" / "kfold").exists()
    lines = (bag / "oof_scores.csv").read_text().splitlines()
    broken = tmp_path / "bag"
    shutil.copytree(bag, broken)
    (broken / "oof_scores.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(RunError, match=rf"^{broken / 'oof_scores.csv'}: 71 rows, the recipe's train \+ val have 72$"):
        audit(broken, out_dir=tmp_path / "x", registry=registry, progress=False, echo=lambda line: None)


def test_user_mistakes_are_one_line(flipped, registry, tmp_path):
    recipe, data = flipped["recipe"], flipped["data"]
    with pytest.raises(MmcoreError, match=r"^--fix and --out go together: --fix drop\|relabel --out cleaned/$"):
        audit(recipe, fix="drop", out_dir=tmp_path / "a", registry=registry)
    with pytest.raises(MmcoreError, match=rf"^--out {data}: train.csv there is an input CSV of the recipe; write the"
                                          " cleaned CSVs elsewhere$"):
        audit(recipe, fix="drop", fix_out=data, out_dir=tmp_path / "a", registry=registry)
    with pytest.raises(RunError, match=r"nowhere: neither a recipe file nor a run directory or k-fold bag \(no recipe.toml\)$"):
        audit(tmp_path / "nowhere", registry=registry)
    with pytest.raises(RunError, match=r"audit: exists and is not an empty folder; give the audit a new --out-dir$"):
        audit(recipe, out_dir=flipped["root"] / "audit", registry=registry)
    assert not (tmp_path / "a").exists()
    from mmcore.cli.main import cli

    result = CliRunner().invoke(cli, ["audit", str(recipe), "--fix", "drop", "--out-dir", str(tmp_path / "b")])
    assert (result.exit_code, result.output) == (1, "--fix and --out go together: --fix drop|relabel --out cleaned/\n")


def test_the_audit_page_opens_offline_with_its_thumbnails(flipped, browser):
    from chromium import requested_urls

    requested_urls(browser)
    browser.get((flipped["root"] / "audit" / "report.html").as_uri())
    assert browser.title == "Label audit: easy.toml"
    urls = requested_urls(browser)
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls
    sources = browser.execute_script("return Array.from(document.querySelectorAll('tr.audit-row img.thumb')).map(i => i.src)")
    assert len(sources) == 72  # every row has its thumbnail (lazy: those below the fold load when scrolled to)
    loaded = browser.execute_script(
        "return Array.from(document.querySelectorAll('tr.audit-row img.thumb')).slice(0, 4)"
        ".map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * 4
    first = browser.find_elements("css selector", "tr.audit-row")[0].get_attribute("data-rank")
    assert first == "1"
