"""The bad-input matrix: every bad CSV, image, recipe and run gives one line naming the file and
the row (or key), and no finished work is lost.

Decided per case: extra columns, a BOM, quoted newlines and huge texts are fine; CMYK, 16-bit,
palette + transparency, animated GIF and 1x1 images are valid and load as RGB; empty, corrupt,
truncated, non-image and too-large images are bad (``data.on_bad_image``: stop with the row, or
skip and count them in results.json).
"""

import csv
import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mmcore.cli.main import cli as mmcore_group
from mmcore.data.checks import find_duplicates, scan_images
from mmcore.data.csvs import load_splits, read_split
from mmcore.data.dataset import Collate, SampleDataset
from mmcore.data.images import BadImageError, load_rgb, open_checked
from mmcore.engine.policies import BadImages
from mmcore.errors import DataError, RunError
from mmcore.interfaces import Preprocessing

HEADER = "local_image_path,label,text_info\n"


# ---------------------------------------------------------------- helpers


def write(path, text, encoding="utf-8"):
    path = Path(path)
    path.write_text(text, encoding=encoding)
    return path


def problems(csv_path, *args, **kwargs):
    with pytest.raises(DataError) as info:
        read_split(csv_path, *args, **kwargs)
    return info.value.problems


def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def huge_png(path, width, height):
    """A valid 1-bit PNG of width x height, all black, written in ~50 KB without allocating it."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    parts = [compressor.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(compressor.compress(row * (height % 1000)) + compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )
    return Path(path)


def jpeg_bytes(size=(64, 64), color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def images(tmp_path):
    """tmp_path with a.jpg (red) and b.jpg (blue)."""
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "b.jpg")
    return tmp_path


# ---------------------------------------------------------------- CSV


def test_csv_missing_file(tmp_path):
    assert problems(tmp_path / "train.csv") == [f"{tmp_path / 'train.csv'}: file not found"]


@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["zero_bytes", "blank_lines"])
def test_csv_empty_file(tmp_path, content):
    path = tmp_path / "train.csv"
    path.write_bytes(content)
    assert problems(path) == [f"{path}: file is empty (expected a header: local_image_path,label,text_info)"]


def test_csv_header_only(tmp_path):
    path = write(tmp_path / "train.csv", HEADER)
    assert problems(path) == [f"{path}: no rows"]


def test_csv_missing_column(images):
    path = write(images / "train.csv", "local_image_path,label\na.jpg,True\n")
    assert problems(path) == [f"{path}: missing column 'text_info' (found: local_image_path, label)"]


def test_csv_extra_columns_are_ignored(images):
    path = write(images / "train.csv", "id,local_image_path,label,text_info,source\n7,a.jpg,True,sale,web\n8,b.jpg,0,,app\n")
    split = read_split(path)
    assert split.paths == (images / "a.jpg", images / "b.jpg")
    assert split.labels == (1, 0) and split.texts == ("sale", "")


@pytest.mark.parametrize(
    "header,found,hint",
    [
        ("image_path,label,text_info", "image_path, label, text_info", "rename 'image_path' to 'local_image_path'"),
        ("local_image_path,Label,text_info", "local_image_path, Label, text_info", "rename 'Label' to 'label'"),
    ],
    ids=["image_path", "Label"],
)
def test_csv_renamed_column_is_pointed_out(images, header, found, hint):
    path = write(images / "train.csv", f"{header}\na.jpg,True,x\n")
    missing = "local_image_path" if header.startswith("image_path") else "label"
    assert problems(path) == [f"{path}: missing column {missing!r} (found: {found}); {hint}"]


def test_csv_without_header_says_the_first_line_must_be_it(images):
    path = write(images / "train.csv", "a.jpg,True,sale\nb.jpg,False,\n")
    found = problems(path)
    assert len(found) == 3
    assert found[0] == (
        f"{path}: missing column 'local_image_path' (found: a.jpg, True, sale); "
        "the first line must be the header local_image_path,label,text_info"
    )


def test_csv_bad_labels_name_their_rows(images):
    path = write(images / "train.csv", HEADER + "a.jpg,yes,\nb.jpg,False,\na.jpg,,\n")
    assert problems(path, images) == [
        f"{path}: row 1: bad label 'yes' (expected True/False, 1/0 or true/false)",
        f"{path}: row 3: bad label '' (expected True/False, 1/0 or true/false)",
    ]


@pytest.mark.parametrize("split_name", ["train", "val"])
def test_csv_only_one_class(images, split_name):
    from mmcore.recipe import DataConfig

    both = HEADER + "a.jpg,True,\nb.jpg,False,\n"
    for name in ("train", "val", "test"):
        write(images / f"{name}.csv", both)
    write(images / f"{split_name}.csv", HEADER + "a.jpg,False,\nb.jpg,0,\n")
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(base_dir=str(images)))
    assert info.value.problems == [
        f"{images / f'{split_name}.csv'}: {split_name} split has only one class (False); AUROC and training need both"
    ]


def test_csv_bom_is_fine(images):
    path = images / "train.csv"
    path.write_bytes("\ufeff".encode() + (HEADER + "a.jpg,True,세일 50%\n").encode("utf-8"))
    split = read_split(path)
    assert split.paths == (images / "a.jpg",) and split.texts == ("세일 50%",) and split.labels == (1,)


def test_csv_not_utf8_names_the_line_and_guesses_korean_excel(images):
    path = images / "train.csv"
    path.write_bytes((HEADER + "a.jpg,True,sale\nb.jpg,False,오늘만 특가\n").encode("cp949"))
    offset = len((HEADER + "a.jpg,True,sale\nb.jpg,False,").encode())
    assert problems(path) == [
        f"{path}: line 3: not UTF-8 text (byte 0x{'오'.encode('cp949')[0]:02x} at offset {offset}); "
        "it looks like CP949/EUC-KR (Korean Windows/Excel); re-save it as UTF-8 (Excel: CSV UTF-8) or convert it: "
        f"iconv -f CP949 -t UTF-8 {path} > {path.with_name('train.utf8.csv')}"
    ]


def test_csv_in_utf16_says_so(images):
    path = images / "train.csv"
    path.write_bytes((HEADER + "a.jpg,True,sale\n").encode("utf-16"))
    assert problems(path) == [
        f"{path}: not UTF-8 text: it is UTF-16 (Excel's 'Unicode Text'); re-save it as UTF-8 (Excel: CSV UTF-8)"
    ]


def test_csv_quoted_newlines_and_commas_are_kept(images):
    path = write(images / "train.csv", HEADER + 'a.jpg,True,"50% OFF\nshop now, today"\nb.jpg,False,"say ""hi"""\n')
    split = read_split(path)
    assert split.texts == ("50% OFF shop now, today", 'say "hi"')  # whitespace (newlines) folded
    assert split.rows == (1, 2) and split.labels == (1, 0)


def test_csv_huge_text_is_kept(images):
    text = "세일 " * 400_000  # 2.4 MB in one field: tokenizers truncate, the CSV layer keeps it
    path = write(images / "train.csv", HEADER + f'a.jpg,True,"{text}"\nb.jpg,False,x\n')
    split = read_split(path)
    assert split.texts[0] == text.strip() and len(split.texts[0]) == 1_199_999


def test_csv_unquoted_comma_names_the_line(images):
    path = write(images / "train.csv", HEADER + "a.jpg,True,sale\nb.jpg,False,buy 1, get 1\n")
    assert problems(path) == [
        f"{path}: line 3: 4 fields, but the header has 3 (put text containing commas in double quotes)"
    ]


def test_csv_unclosed_quote_names_the_line(images):
    path = write(images / "train.csv", HEADER + 'a.jpg,True,"50% off\nb.jpg,False,x\n')
    assert problems(path) == [f"{path}: line 2: a double quote is opened and never closed"]


def test_csv_problem_at_validation_creates_no_run_directory(images, tmp_path):
    write(images / "train.csv", HEADER + "a.jpg,True,\nmissing.jpg,False,\n")
    write(images / "val.csv", HEADER + "a.jpg,True,\nb.jpg,False,\n")
    write(images / "test.csv", HEADER + "a.jpg,True,\nb.jpg,False,\n")
    recipe = write(tmp_path / "r.toml", RECIPE.format(data=images, on_bad_image="error", cache=tmp_path / "cache"))
    out = tmp_path / "run"
    result = CliRunner().invoke(mmcore_group, ["run", str(recipe), "--out", str(out), "--quiet"])
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [f"{images / 'train.csv'}: row 2: image not found: {images / 'missing.jpg'}"]
    assert not out.exists()


# ---------------------------------------------------------------- images: bad ones


def bad_image_files(directory):
    """name -> (path, expected reason or reason prefix)."""
    directory = Path(directory)
    good = jpeg_bytes()
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png, "PNG")
    corrupt = bytearray(good)
    corrupt[200:400] = b"\x55" * 200  # the Huffman tables
    files = {
        "zero_bytes.jpg": (b"", "empty file (0 bytes)"),
        "not_an_image.jpg": (b"<html>404 not found</html>", "not an image Pillow can read"),
        "truncated.jpg": (good[: len(good) // 2], "corrupt or truncated image ("),
        "truncated.png": (png.getvalue()[:-30], "corrupt or truncated image ("),
        "corrupt.jpg": (bytes(corrupt), "corrupt or truncated image ("),
    }
    out = {}
    for name, (data, reason) in files.items():
        (directory / name).write_bytes(data)
        out[name] = (directory / name, reason)
    return out


@pytest.mark.parametrize("name", ["zero_bytes.jpg", "not_an_image.jpg", "truncated.jpg", "truncated.png", "corrupt.jpg"])
def test_bad_image_reason(tmp_path, name):
    path, reason = bad_image_files(tmp_path)[name]
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    message = str(info.value)
    assert message == reason if not reason.endswith("(") else message.startswith(reason) and message.endswith(")")
    assert "\n" not in message


def test_missing_image_reason(tmp_path):
    with pytest.raises(BadImageError, match=r"^image not found$"):
        load_rgb(tmp_path / "gone.jpg")


def test_huge_image_is_refused_from_its_header_with_low_memory(tmp_path):
    """20000x20000: refused by data.max_image_pixels before decoding (Pillow's own guard would
    say "decompression bomb" without the size, or accept it up to 2x its limit)."""
    path = huge_png(tmp_path / "huge.png", 20000, 20000)
    assert path.stat().st_size < 200_000
    script = (
        "import re\n"
        "from mmcore.data.images import load_rgb, BadImageError\n"
        "try:\n"
        f"    load_rgb({str(path)!r})\n"
        "except BadImageError as exc:\n"
        "    print(exc)\n"
        # VmHWM: this process's peak (ru_maxrss would carry over pytest's own peak through fork)
        "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    message, peak_kib = result.stdout.splitlines()
    assert message == "image too large (20000x20000 = 400000000 pixels > data.max_image_pixels = 89478485)"
    assert int(peak_kib) < 250_000  # decoding would take >= 400 MB (one byte per pixel)


def test_max_image_pixels_replaces_pillows_guard(tmp_path):
    from PIL import Image as PILImage

    path = huge_png(tmp_path / "big.png", 12000, 10000)  # above Pillow's 89M limit
    with open(path, "rb") as handle:
        assert open_checked(handle, max_pixels=200_000_000).size == (12000, 10000)
    with pytest.raises(BadImageError) as info:
        load_rgb(path, max_pixels=50_000_000)
    assert str(info.value) == "image too large (12000x10000 = 120000000 pixels > data.max_image_pixels = 50000000)"
    assert PILImage.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global is restored


def test_bad_images_are_reported_with_csv_row_and_path(tmp_path):
    files = bad_image_files(tmp_path)
    huge_png(tmp_path / "huge.png", 20000, 20000)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.jpg")
    names = ["ok.jpg", "zero_bytes.jpg", "huge.png", "not_an_image.jpg", "truncated.jpg"]
    path = write(tmp_path / "test.csv", HEADER + "".join(f"{n},{i % 2},\n" for i, n in enumerate(names)))
    split = read_split(path)
    dataset = SampleDataset(split, preprocessing=Preprocessing(size=(16, 16)), max_image_pixels=1_000_000)
    batch = Collate(dataset.preprocessing)([dataset[i] for i in range(len(dataset))])
    assert batch["size"] == 1 and batch["bad_indices"] == [1, 2, 3, 4]
    assert batch["errors"][:3] == [
        f"{path}: row 2: {tmp_path / 'zero_bytes.jpg'}: empty file (0 bytes)",
        f"{path}: row 3: {tmp_path / 'huge.png'}: image too large (20000x20000 = 400000000 pixels > data.max_image_pixels = 1000000)",
        f"{path}: row 4: {tmp_path / 'not_an_image.jpg'}: not an image Pillow can read",
    ]
    assert batch["errors"][3].startswith(f"{path}: row 5: {files['truncated.jpg'][0]}: corrupt or truncated image (")

    # on_bad_image = "error": stop, every row listed, and how to skip them instead
    with pytest.raises(DataError) as info:
        BadImages("error").check(batch, "test")
    assert info.value.problems == batch["errors"] + [
        'set data.on_bad_image = "skip" to leave such images out (counted in results.json)'
    ]
    # "skip": counted once per image, however many epochs see it
    skip = BadImages("skip")
    skip.check(batch, "train")
    skip.check(batch, "train")
    skip.check({"errors": batch["errors"][:1]}, "test")
    assert skip.counts() == {"train": 4, "test": 1}


def test_scan_images_finds_header_problems_before_a_run(tmp_path):
    bad_image_files(tmp_path)
    huge_png(tmp_path / "huge.png", 20000, 20000)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.jpg")
    names = ["ok.jpg", "zero_bytes.jpg", "huge.png", "not_an_image.jpg", "truncated.jpg"]
    path = write(tmp_path / "train.csv", HEADER + "".join(f"{n},{i % 2},\n" for i, n in enumerate(names)))
    split = read_split(path)
    (tmp_path / "ok.jpg").unlink()  # gone since validation
    found = scan_images(split)
    assert found[:4] == [
        f"{path}: row 1: {tmp_path / 'ok.jpg'}: image not found",
        f"{path}: row 2: {tmp_path / 'zero_bytes.jpg'}: empty file (0 bytes)",
        f"{path}: row 3: {tmp_path / 'huge.png'}: image too large (20000x20000 = 400000000 pixels > data.max_image_pixels = 89478485)",
        f"{path}: row 4: {tmp_path / 'not_an_image.jpg'}: not an image Pillow can read",
    ]
    # a JPEG cut inside its header is found too (one cut in its body only when decoding)
    assert len(found) == 5 and found[4].startswith(f"{path}: row 5: {tmp_path / 'truncated.jpg'}: corrupt or truncated image (")


# ---------------------------------------------------------------- images: valid odd ones


def pixels(image):
    assert image.mode == "RGB"
    return np.asarray(image)


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    image = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # white
    image.paste((255, 0, 0, 0), (0, 0, 8, 16))  # cyan on the left
    image.save(tmp_path / "cmyk.jpg", quality=95)
    rgb = pixels(load_rgb(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(rgb[8, 2] - [0, 255, 255]).max() < 12
    assert np.abs(rgb[8, 13] - [255, 255, 255]).max() < 12


def test_16_bit_png_loads_as_rgb_on_a_fixed_scale(tmp_path):
    gray = np.full((8, 8), 32896, dtype=np.uint16)  # 50% of 65535
    gray[:, 4:] = 2570  # a dark half stays dark (not stretched to the image's own maximum)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as original:
        assert original.mode.startswith("I")
    rgb = pixels(load_rgb(tmp_path / "g16.png"))
    assert rgb[0, 0].tolist() == [128, 128, 128] and rgb[0, 7].tolist() == [10, 10, 10]


def test_palette_with_transparency_is_flattened_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    image.paste(1, (0, 0, 2, 4))
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    rgb = pixels(load_rgb(tmp_path / "p.png"))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 3].tolist() == [255, 255, 255]


def test_grayscale_alpha_is_flattened_on_white(tmp_path):
    image = Image.new("LA", (4, 4), (0, 0))
    image.paste((0, 255), (0, 0, 2, 4))
    image.save(tmp_path / "la.png")
    rgb = pixels(load_rgb(tmp_path / "la.png"))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 3].tolist() == [255, 255, 255]


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(tmp_path / "anim.gif") as original:
        assert original.n_frames == 3
    rgb = pixels(load_rgb(tmp_path / "anim.gif"))
    assert rgb.shape == (8, 8, 3) and rgb[4, 4].tolist() == [255, 0, 0]


def test_one_pixel_image_loads_and_preprocesses(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    assert pixels(load_rgb(tmp_path / "dot.png")).tolist() == [[[10, 20, 30]]]
    path = write(tmp_path / "t.csv", HEADER + "dot.png,True,\n")
    dataset = SampleDataset(read_split(path), preprocessing=Preprocessing(size=(16, 16), mean=(0, 0, 0), std=(1, 1, 1)))
    values = dataset[0]["vision"]["pixel_values"]
    assert values.shape == (3, 16, 16)
    assert torch.allclose(values[:, 8, 8], torch.tensor([10, 20, 30]) / 255, atol=1e-3)


def test_load_rgb_reads_file_objects(tmp_path):
    assert load_rgb(io.BytesIO(jpeg_bytes(size=(5, 7)))).size == (5, 7)
    with pytest.raises(BadImageError, match=r"^empty file \(0 bytes\)$"):
        load_rgb(io.BytesIO(b""))


# ---------------------------------------------------------------- duplicates (leakage)


def test_duplicates_across_splits_are_counted_per_pair(images):
    shutil.copy(images / "a.jpg", images / "a_copy.jpg")  # same bytes, other name
    Image.new("RGB", (8, 8), (0, 200, 0)).save(images / "c.jpg")
    Image.new("RGB", (8, 8), (0, 100, 0)).save(images / "d.jpg")
    Image.new("RGB", (8, 8), (50, 100, 0)).save(images / "e.jpg")
    write(images / "train.csv", HEADER + "a.jpg,True,\nb.jpg,False,\n")
    write(images / "val.csv", HEADER + "c.jpg,True,\nd.jpg,False,\n")
    write(images / "test.csv", HEADER + "e.jpg,True,\na_copy.jpg,True,\nb.jpg,False,\na.jpg,True,\nc.jpg,False,\n")
    splits = {name: read_split(images / f"{name}.csv") for name in ("train", "val", "test")}
    report = find_duplicates(splits)
    assert report.warnings() == [
        "warning: 3 images of test.csv also appear in train.csv (same file content): leakage inflates test metrics",
        "warning: 1 image of test.csv also appears in val.csv (same file content): leakage inflates test metrics",
    ]
    assert report.counts() == {"val_in_train": 0, "test_in_train": 3, "test_in_val": 1}
    assert report.total == 4
    test_in_train = report.overlaps[1]
    assert test_in_train.rows == ((2, "a_copy.jpg", 1, "a.jpg"), (3, "b.jpg", 2, "b.jpg"), (4, "a.jpg", 1, "a.jpg"))


def test_no_duplicates_no_warnings(images):
    for name, image in (("train", "a.jpg"), ("val", "b.jpg")):
        write(images / f"{name}.csv", HEADER + f"{image},True,\n")
    (images / "gone.jpg").write_bytes(b"")
    splits = {name: read_split(images / f"{name}.csv") for name in ("train", "val")}
    report = find_duplicates(splits)
    assert report.warnings() == [] and report.counts() == {"val_in_train": 0}


# ---------------------------------------------------------------- recipes (through `mmcore run`)

RECIPE = """
experiment = "bad_inputs"
seed = 1
[data]
base_dir = "{data}"
num_workers = 0
on_bad_image = "{on_bad_image}"
[vision]
name = "fake_cnn"
params = {{ width = 8 }}
[text]
name = "fake_text"
[pooling]
name = "mean"
[fusion]
name = "gated"
params = {{ dim = 8 }}
[head]
name = "mlp"
params = {{ hidden = [8] }}
[train]
epochs = 1
batch_size = 8
learning_rate = 0.003
[cache]
dir = "{cache}"
[logging]
progress = false
tensorboard = false
"""


def recipe_cases(tmp_path, data):
    """name -> (recipe path, expected stderr line; '...' at the end means a prefix)."""
    base = RECIPE.format(data=data, on_bad_image="error", cache=tmp_path / "cache")
    r = lambda name, text: write(tmp_path / f"{name}.toml", text)  # noqa: E731
    cases = {}
    p = r("unknown_key", base.replace("epochs = 1", "epochs = 1\nlr = 0.1"))
    cases["unknown_key"] = (p, f"{p}: train.lr: unknown key (did you mean learning_rate?)")
    p = r("wrong_type", base.replace("batch_size = 8", 'batch_size = "8"'))
    cases["wrong_type"] = (p, f"{p}: train.batch_size: must be an integer (got a string '8')")
    p = r("unknown_component", base.replace('"fake_cnn"', '"fake_cnm"'))
    cases["unknown_component"] = (p, f"{p}: vision.name: unknown vision encoder 'fake_cnm'; did you mean 'fake_cnn'? ...")
    p = r("bad_param_value", base.replace('on_bad_image = "error"', 'on_bad_image = "ignore"'))
    cases["bad_param_value"] = (p, f"{p}: data.on_bad_image: must be one of ")
    p = r("missing_extends", 'extends = "base.toml"\n' + base)
    cases["missing_extends"] = (p, f"{p.resolve()}: extends: recipe file not found: {tmp_path / 'base.toml'}")
    r("cycle_b", 'extends = "extends_cycle.toml"\n')
    p = r("extends_cycle", 'extends = "cycle_b.toml"\n' + base)
    cases["extends_cycle"] = (p, f"{(tmp_path / 'cycle_b.toml').resolve()}: extends: cycle (...")
    p = r("seed_too_big", base.replace("seed = 1", "seed = 9223372036854775807"))
    cases["seed_too_big"] = (p, f"{p}: seed: must be in [0, 4294967295] (got 9223372036854775807)")
    p = r("nan_learning_rate", base.replace("learning_rate = 0.003", "learning_rate = nan"))
    cases["nan_learning_rate"] = (p, f"{p}: train.learning_rate: must be a finite number (got nan)")
    p = r("inf_weight_decay", base.replace("learning_rate = 0.003", "learning_rate = 0.003\nweight_decay = inf"))
    cases["inf_weight_decay"] = (p, f"{p}: train.weight_decay: must be a finite number (got inf)")
    p = r("huge_batch", base.replace("batch_size = 8", "batch_size = 4294967296"))
    cases["huge_batch"] = (p, f"{p}: train.batch_size: must be <= 2147483647 (got 4294967296)")
    (tmp_path / "a_directory.toml").mkdir()
    p = r("extends_directory", 'extends = "a_directory.toml"\n' + base)
    cases["extends_directory"] = (
        p, f"{p.resolve()}: extends: {tmp_path / 'a_directory.toml'} is a directory; name a TOML recipe file"
    )
    p = r("extends_dev_zero", 'extends = "/dev/zero"\n' + base)
    cases["extends_dev_zero"] = (p, f"{p.resolve()}: extends: /dev/zero is not a regular file; name a TOML recipe file")
    r("huge_base", "# padding\n" * 120_000)
    p = r("extends_huge", 'extends = "huge_base.toml"\n' + base)
    cases["extends_huge"] = (
        p, f"{p.resolve()}: extends: {tmp_path / 'huge_base.toml'} is larger than 1 MiB; a recipe is a small TOML file"
    )
    p = r("deep_arrays", "x = " + "[" * 100_000 + "\n" + base)  # tomllib: a RecursionError of 2,990 lines
    cases["deep_arrays"] = (p, f"{p}: line 1: nested more than 32 levels deep (tables, arrays or dotted keys)")
    p = r("deep_dotted_key", "[train]\n" + "a" + ".a" * 100_000 + " = 1\n" + base)  # tomllib: gigabytes
    cases["deep_dotted_key"] = (p, f"{p}: line 2: nested more than 32 levels deep (tables, arrays or dotted keys)")
    p = r("deep_tables", "[" + ".".join(["t"] * 20) + "]\n" + ".".join(["k"] * 20) + " = 1\n" + base)
    cases["deep_tables"] = (p, f"{p}: nested more than 32 levels deep (tables, arrays or dotted keys)")
    for n in range(40):
        r(f"chain{n}", f'extends = "chain{n + 1}.toml"\n')
    r("chain40", base)
    cases["deep_extends"] = (tmp_path / "chain0.toml", f"{(tmp_path / 'chain31.toml').resolve()}: extends: more than 32 recipes extend one another")
    p = r("eps_allowed", base.replace('on_bad_image = "error"', 'on_bad_image = "error"\nimage_formats = ["JPEG", "EPS"]'))
    cases["eps_allowed"] = (p, f"{p}: data.image_formats: EPS is never allowed: Pillow decodes it by starting an external program")
    p = r("unset_data_dir", base.replace(f'base_dir = "{data}"', 'base_dir = "${DATA_DIR}/ads"'))
    cases["unset_data_dir"] = (
        p,
        f"{p}: data.base_dir: environment variable DATA_DIR is not set (export DATA_DIR=... or --set data.base_dir=...)",
    )
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "unknown_key", "wrong_type", "unknown_component", "bad_param_value", "missing_extends", "extends_cycle", "unset_data_dir",
        "seed_too_big", "nan_learning_rate", "inf_weight_decay", "huge_batch", "extends_directory", "extends_dev_zero",
        "extends_huge", "eps_allowed", "deep_arrays", "deep_dotted_key", "deep_tables", "deep_extends",
    ],
)
def test_recipe_problem_is_one_line_and_creates_no_run(tmp_path, images, monkeypatch, case):
    monkeypatch.delenv("DATA_DIR", raising=False)
    path, expected = recipe_cases(tmp_path, images)[case]
    out = tmp_path / "run"
    result = CliRunner().invoke(mmcore_group, ["run", str(path), "--out", str(out), "--quiet"])
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1
    if expected.endswith("...") or expected.endswith(" "):
        assert lines[0].startswith(expected.removesuffix("..."))
    else:
        assert lines[0] == expected
    assert not out.exists()


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small dataset (16/8/8) and a copy with a truncated train image (row 3) and an empty
    test image (row 2)."""
    from mmcore.commands.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("bad_inputs")
    good = make_demo_dataset(root / "good", n_train=16, n_val=8, n_test=8, size=(48, 48))
    bad = Path(shutil.copytree(good, root / "bad"))
    rows = {name: list(csv.reader(open(bad / f"{name}.csv", encoding="utf-8")))[1:] for name in ("train", "test")}
    truncated = bad / rows["train"][2][0]
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty = bad / rows["test"][1][0]
    empty.write_bytes(b"")
    return {"root": root, "good": good, "bad": bad, "truncated": truncated, "empty": empty}


def mmcore_subprocess(*args):
    """The real ``python -m mmcore`` (like the ``cli`` fixture, usable by module fixtures)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mmcore", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def run_recipe(tiny, on_bad_image, name):
    text = RECIPE.format(data=tiny["bad"], on_bad_image=on_bad_image, cache=tiny["root"] / "cache")
    return write(tiny["root"] / f"{name}.toml", text.replace("[cache]\n", "[cache]\nenabled = false\n"))


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def resume(run_dir, *extra):
    return CliRunner().invoke(mmcore_group, ["run", *map(str, extra), "--resume", str(run_dir), "--quiet"])


def refused(invoke, run_dir, expected):
    """``invoke()`` exits 4 with exactly ``expected`` and leaves ``run_dir`` byte for byte as it was."""
    before = snapshot(run_dir)
    result = invoke()
    assert result.exit_code == 4, result.output
    assert result.stderr.splitlines() == [expected]
    assert snapshot(run_dir) == before


# Each real run happens once, in one test (module fixtures would run once per xdist worker).


def test_run_with_a_bad_image_stops_with_its_row_and_cannot_be_evaluated_or_resumed(tiny):
    out = tiny["root"] / "failed-run"
    result = mmcore_subprocess("run", run_recipe(tiny, "error", "error"), "--out", out, "--quiet")
    assert result.returncode == 3, result.stderr
    train_csv = tiny["bad"] / "train.csv"
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"{train_csv}: row 3: {tiny['truncated']}: corrupt or truncated image (")
    assert lines[-1] == 'set data.on_bad_image = "skip" to leave such images out (counted in results.json)'
    # found by the header scan before anything started: no half-made run directory
    assert not out.exists()
    result = CliRunner().invoke(mmcore_group, ["eval", str(out), "--quiet"])
    assert result.exit_code == 4 and result.stderr.splitlines() == [f"{out}: run directory not found"]
    result = resume(out)
    assert result.exit_code == 4 and result.stderr.splitlines() == [f"{out}: run directory not found"]


def test_run_skipping_bad_images_completes_counts_them_and_refuses_resume(tiny):
    out = tiny["root"] / "skipped-run"
    result = mmcore_subprocess("run", run_recipe(tiny, "skip", "skip"), "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_images"] == {"train": 1, "test": 1}
    predictions = json.loads((out / "test_predictions.json").read_text())
    empty_name = str(tiny["empty"].relative_to(tiny["bad"]))
    assert len(predictions) == 7 and empty_name not in [p["path"] for p in predictions]
    assert "skipped images" in result.stdout

    # resume of a finished run
    refused(lambda: resume(out), out, f"{out}: run already completed; nothing to resume (start a new run instead)")
    # resume of an interrupted run with another recipe
    stopped = Path(shutil.copytree(out, tiny["root"] / "interrupted-run"))
    (stopped / "status.json").write_text(json.dumps({"state": "interrupted"}))
    assert (stopped / "last.ckpt").is_file()
    recipe = run_recipe(tiny, "skip", "skip").read_text()
    other = write(tiny["root"] / "other.toml", recipe.replace("epochs = 1", "epochs = 3"))
    refused(
        lambda: resume(stopped, other),
        stopped,
        f"{stopped}: this run was started with another recipe (differs at train.epochs); "
        f"resume it without a recipe: mmcore run --resume {stopped}",
    )


def test_eval_of_a_missing_run_directory(tmp_path):
    result = CliRunner().invoke(mmcore_group, ["eval", str(tmp_path / "nope"), "--quiet"])
    assert result.exit_code == 4
    assert result.stderr.splitlines() == [f"{tmp_path / 'nope'}: run directory not found"]
    assert not (tmp_path / "nope").exists()


def test_resume_of_a_missing_run_directory(tmp_path):
    result = resume(tmp_path / "nope")
    assert result.exit_code == 4
    assert result.stderr.splitlines() == [f"{tmp_path / 'nope'}: run directory not found"]
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------- disk full


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_on_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from mmcore.engine import checkpoint

    path = tmp_path / "checkpoint_best.ckpt"
    checkpoint.save_checkpoint(path, {"format": "mmcore.checkpoint", "epoch": 1, "w": torch.ones(3)})
    monkeypatch.setattr("mmcore.io.os.fsync", enospc)
    with pytest.raises(RunError) as info:
        checkpoint.save_checkpoint(path, {"format": "mmcore.checkpoint", "epoch": 2, "w": torch.zeros(3)})
    assert str(info.value) == f"{path}: could not write (No space left on device); the previous version is kept"
    monkeypatch.undo()
    kept = checkpoint.read_checkpoint(path)
    assert kept["epoch"] == 1 and kept["w"].tolist() == [1, 1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_best.ckpt"]  # no temporary left


def test_disk_full_while_writing_the_checkpoint_bytes(tmp_path, monkeypatch):
    from mmcore import io as mmcore_io
    from mmcore.engine import checkpoint

    path = tmp_path / "checkpoint_best.ckpt"
    checkpoint.save_checkpoint(path, {"format": "mmcore.checkpoint", "epoch": 1, "w": torch.ones(3)})
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        def __init__(self, handle):
            self.handle = handle

        def writable(self):
            return True

        def write(self, data):  # the first KB fits, then the disk is full
            if self.handle.tell() + len(data) > 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def fileno(self):
            return self.handle.fileno()

        def close(self):
            self.handle.close()
            super().close()

    monkeypatch.setattr(mmcore_io.os, "fdopen", lambda fd, mode, **kw: FullDisk(real_fdopen(fd, mode, **kw)))
    with pytest.raises(RunError) as info:
        checkpoint.save_checkpoint(path, {"format": "mmcore.checkpoint", "epoch": 2, "w": torch.zeros(10000)})
    assert str(info.value) == f"{path}: could not write (No space left on device); the previous version is kept"
    monkeypatch.undo()
    assert checkpoint.read_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_best.ckpt"]


def test_disk_full_during_a_run_fails_it_and_keeps_the_best_checkpoint(tiny, registry, tmp_path, monkeypatch):
    """The final checkpoint write (with the decision) hits a full disk: the run is marked failed
    with the message, and the epoch checkpoint written before it is intact."""
    from mmcore.commands.run import run_training
    from mmcore.engine.checkpoint import read_checkpoint
    from mmcore.recipe import load_recipe

    recipe_path = write(tmp_path / "r.toml", RECIPE.format(data=tiny["good"], on_bad_image="error", cache=tmp_path / "cache"))
    recipe = load_recipe(recipe_path, registry=registry)
    out = tmp_path / "run"
    real_replace = os.replace
    writes = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "checkpoint_best.ckpt":
            writes.append(dst)
            if len(writes) == 2:
                enospc()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(RunError) as info:
        run_training(recipe, recipe_path=recipe_path, out=out, registry=registry, progress=False, echo=lambda *a: None)
    monkeypatch.undo()
    best = out / "checkpoint_best.ckpt"
    message = f"{best}: could not write (No space left on device); the previous version is kept"
    assert str(info.value) == message
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == message
    kept = read_checkpoint(best)
    assert kept["epoch"] == 1 and "decision" not in kept
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- reliability, second round (issue 14)


def test_an_over_long_image_path_in_a_csv_is_a_row_error(images):
    long_name = "x" * 300 + ".jpg"  # over NAME_MAX: is_file() raised ENAMETOOLONG (a traceback)
    path = write(images / "train.csv", HEADER + f"a.jpg,True,\n{long_name},False,\n")
    assert problems(path) == [f"{path}: row 2: cannot read file (file name too long): {images / long_name}"]


def test_a_directory_named_as_an_image_is_not_image_not_found(images):
    (images / "folder.jpg").mkdir()
    path = write(images / "train.csv", HEADER + "a.jpg,True,\nfolder.jpg,False,\n")
    assert problems(path) == [f"{path}: row 2: is a directory, not an image file: {images / 'folder.jpg'}"]
    with pytest.raises(BadImageError, match=r"^is a directory, not an image file$"):
        load_rgb(images / "folder.jpg")


def test_a_fifo_named_as_an_image_is_refused_without_blocking(images):
    os.mkfifo(images / "pipe.jpg")  # open() would wait for a writer forever
    split = read_split(write(images / "t.csv", HEADER + "a.jpg,True,\n"))
    split = split.subset([0])
    object.__setattr__(split, "paths", (images / "pipe.jpg",))
    assert scan_images(split) == [f"{split.csv}: row 1: {images / 'pipe.jpg'}: not a regular file (a device, FIFO or socket)"]


def eps_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buffer, "EPS")
    return buffer.getvalue()


def test_a_jpg_that_is_really_eps_is_a_row_error_and_ghostscript_never_starts(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    started, opened = [], []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("a program was started"))
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: started.append(a) or pytest.fail("a program was started"))
    real_open = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1) or real_open(self))
    (tmp_path / "ad.jpg").write_bytes(eps_bytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.jpg")
    path = write(tmp_path / "train.csv", HEADER + "ok.jpg,True,\nad.jpg,False,\n")
    split = read_split(path)
    reason = "image format EPS is not allowed (data.image_formats: JPEG, PNG, GIF, WEBP, BMP, TIFF)"
    assert scan_images(split) == [f"{path}: row 2: {tmp_path / 'ad.jpg'}: {reason}"]  # the header scan
    dataset = SampleDataset(split, preprocessing=Preprocessing(size=(16, 16)))
    batch = Collate(dataset.preprocessing)([dataset[0], dataset[1]])  # decoding (training, eval, predict)
    assert batch["size"] == 1 and batch["errors"] == [f"{path}: row 2: {tmp_path / 'ad.jpg'}: {reason}"]
    from mmcore.ocr.engines import decode_image

    with pytest.raises(BadImageError, match=r"^image format EPS is not allowed"):
        decode_image((tmp_path / "ad.jpg").read_bytes())  # OCR
    assert started == [] and opened == []  # Pillow's EPS plugin never even parsed it


def test_image_formats_narrow_what_is_read(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    assert load_rgb(tmp_path / "b.png", formats=("PNG",)).size == (8, 8)
    with pytest.raises(BadImageError) as info:
        load_rgb(tmp_path / "a.jpg", formats=("PNG",))
    assert str(info.value) == "image format JPEG is not allowed (data.image_formats: PNG)"


def exif_rotated_jpeg(path, orientation=6):
    """A 24x16 JPEG (stored landscape) with big colour blocks and the given EXIF orientation."""
    stored = Image.new("RGB", (24, 16), (250, 250, 250))
    stored.paste((220, 20, 20), (0, 0, 8, 8))  # red top-left: an asymmetric marker
    stored.paste((20, 20, 220), (16, 8, 24, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def test_an_exif_rotated_photo_reaches_the_encoder_upright(tmp_path):
    from PIL import ImageOps

    path = exif_rotated_jpeg(tmp_path / "phone.jpg")
    with Image.open(path) as raw:  # what Pillow stores, decoded the same way, turned by hand
        assert raw.size == (24, 16)
        by_hand = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    image = load_rgb(path)
    assert image.size == (16, 24)  # portrait, as the phone showed it
    assert np.array_equal(np.asarray(image), np.asarray(by_hand))
    with Image.open(path) as raw:
        assert np.array_equal(np.asarray(image), np.asarray(ImageOps.exif_transpose(raw).convert("RGB")))
    # through the dataset, i.e. what the encoder gets (training, cache fill, eval, predict)
    split = read_split(write(tmp_path / "t.csv", HEADER + "phone.jpg,True,\n"))
    preprocessing = Preprocessing(size=(24, 16), mean=(0, 0, 0), std=(1, 1, 1))
    got = SampleDataset(split, preprocessing=preprocessing)[0]["vision"]["pixel_values"]
    assert torch.equal(got, preprocessing(by_hand)["pixel_values"])


def test_report_thumbnails_are_upright_too(tmp_path):
    from mmcore.evaluation.report import write_thumbnails

    files, reason = write_thumbnails(exif_rotated_jpeg(tmp_path / "phone.jpg"), tmp_path / "files", [12])
    assert reason is None
    with Image.open(files[0]) as thumb:
        assert thumb.size == (8, 12)  # portrait
        assert thumb.convert("RGB").getpixel((6, 1))[0] > 150  # red block now top-right


def test_decode_version_changes_the_vision_cache_key():
    from mmcore.data.images import DECODE_VERSION

    assert DECODE_VERSION == 3  # 3: EXIF orientation applied; old entries (2) are not reused


def test_nan_learning_rate_from_set_is_refused(tmp_path, images):
    path = write(tmp_path / "r.toml", RECIPE.format(data=images, on_bad_image="error", cache=tmp_path / "cache"))
    out = tmp_path / "run"
    result = CliRunner().invoke(mmcore_group, ["run", str(path), "--set", "train.learning_rate=inf", "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{path} (--set train.learning_rate): train.learning_rate: must be a finite number (got inf)"
    ]
    assert not out.exists()


def test_nan_stop_before_any_checkpoint_says_so(cli, tiny_recipe, tmp_path):
    path = tiny_recipe(vision={"params": {"nan_after": 1}}, train={"finetune_layers": -1})
    out = tmp_path / "run"
    result = cli("run", path, "--out", out, "--quiet", check=False)
    assert result.returncode == 4
    assert result.stderr.strip() == (
        "non-finite loss (nan) at step 2 (epoch 1, batch 2); stopped before any checkpoint was written "
        '(set train.on_nan = "skip" to skip such batches)'
    )
    assert not (out / "last.ckpt").exists() and not (out / "checkpoint_best.ckpt").exists()


class _Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_checkpoint_refusal_says_what_and_why_without_the_unsafe_advice(tmp_path):
    from mmcore.engine.checkpoint import read_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"format": "mmcore.checkpoint", "x": _Code()}, path)
    with pytest.raises(RunError) as info:
        read_checkpoint(path)
    assert str(info.value) == (
        f"{path}: not a loadable mmcore checkpoint (it refers to posix.system, which is code, not data: "
        "refused without running it); only tensors and plain types are accepted"
    )
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize(
    "command,target",
    [
        (["eval", "RUN"], "mmcore.commands.evaluate.evaluate_run"),
        (["predict", "RUN", "in.csv", "-o", "out.csv"], "mmcore.cli.predict.predict_csv"),
        (["ocr", "in.csv", "-o", "out.csv"], "mmcore.commands.ocr.run_ocr"),
    ],
    ids=["eval", "predict", "ocr"],
)
def test_sigint_exits_130_like_run(tmp_path, command, target):
    """A real SIGINT arrives while the command works (its work function is replaced by one that signals)."""
    (tmp_path / "in.csv").write_text(HEADER)
    module, name = target.rsplit(".", 1)
    script = (
        "import os, signal, sys, time, importlib\n"
        # as in a terminal, also when the suite runs as a background job (which ignores SIGINT)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"module = importlib.import_module({module!r})\n"
        "def work(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        f"setattr(module, {name!r}, work)\n"
        "from mmcore.cli.main import main\n"
        f"sys.argv = ['mmcore', *{command!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "Aborted" not in result.stderr


# ---------------------------------------------------------------- every input bounded (issue 26)


def sparse_file(path, size=2 << 30):
    """A file of ``size`` bytes that takes no disk space (``truncate``): reading it would take ``size`` of memory."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return Path(path)


def three_splits(directory, train_rows):
    """train.csv with ``train_rows``, val.csv and test.csv with a.jpg and b.jpg."""
    write(directory / "train.csv", HEADER + train_rows)
    for name in ("val", "test"):
        write(directory / f"{name}.csv", HEADER + "a.jpg,True,\nb.jpg,False,\n")
    return directory / "train.csv"


def test_an_image_file_over_max_image_bytes_stops_the_run_unread(images, tmp_path):
    """A 2 GiB sparse file was read whole by 8 threads (2.67 GB) and the run went on: now the CSV read's
    ``stat`` refuses it, one line naming the row and the file, before any image is opened."""
    big = sparse_file(images / "big.jpg")
    train = three_splits(images, "a.jpg,True,\nb.jpg,False,\nbig.jpg,True,\n")
    expected = f"{train}: row 3: image file too large (2147483648 bytes > data.max_image_bytes = 50000000): {big}"
    assert problems(train) == [expected]
    recipe = write(tmp_path / "r.toml", RECIPE.format(data=images, on_bad_image="skip", cache=tmp_path / "cache"))
    result = CliRunner().invoke(mmcore_group, ["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"])
    assert (result.exit_code, result.stderr.splitlines()) == (3, [expected])
    assert not (tmp_path / "run").exists()


def test_max_image_bytes_is_the_recipe_key_and_every_reader_keeps_to_it(images):
    from mmcore.data.checks import hash_files
    from mmcore.data.images import read_image_bytes
    from mmcore.recipe.schema import DataConfig

    size = (images / "a.jpg").stat().st_size
    train = write(images / "train.csv", HEADER + "a.jpg,True,\n")
    assert problems(train, max_image_bytes=size - 1) == [
        f"{train}: row 1: image file too large ({size} bytes > data.max_image_bytes = {size - 1}): {images / 'a.jpg'}"
    ]
    assert read_split(train, max_image_bytes=size).paths == (images / "a.jpg",)
    assert DataConfig().max_image_bytes == 50_000_000
    with pytest.raises(BadImageError, match=rf"^image file too large \({size} bytes > data.max_image_bytes = {size - 1}\)$"):
        read_image_bytes(images / "a.jpg", size - 1)
    assert read_image_bytes(images / "a.jpg", size) == (images / "a.jpg").read_bytes()
    big = sparse_file(images / "big.jpg")
    os.mkfifo(images / "pipe.jpg")  # hashing opened it and waited for a writer forever
    assert hash_files([big, images / "pipe.jpg"]) == [None, None]


def test_ocr_refuses_an_image_over_the_limit_unread(tmp_path):
    from mmcore.ocr.engines import ImageReader

    big = sparse_file(tmp_path / "big.png")
    result = ImageReader(engine=None, lang="eng")(7, big)
    assert (result.key, result.text, result.error) == (
        7, None, "cannot read image: image file too large (2147483648 bytes > data.max_image_bytes = 50000000)"
    )


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_csv_that_is_a_fifo_a_device_or_a_directory_is_refused_unopened(tmp_path, kind):
    path = {"fifo": tmp_path / "train.csv", "device": Path("/dev/zero"), "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # opening it would wait for a writer forever; /dev/zero would be read until killed
    what = "is a directory" if kind == "directory" else "is not a regular file"
    assert problems(path) == [f"{path}: {what}; name a CSV file"]
    if kind != "directory":  # (click refuses a directory itself)
        result = CliRunner().invoke(mmcore_group, ["shard", str(path), "--out", str(tmp_path / "shards")])
        assert (result.exit_code, result.stderr.splitlines()) == (3, [f"{path}: {what}; name a CSV file"])


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_recipe_named_on_the_command_line_that_is_a_fifo_or_device_is_one_line(tmp_path, kind):
    path = tmp_path / "r.toml" if kind == "fifo" else Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(path)
    result = CliRunner().invoke(mmcore_group, ["show", str(path)])
    assert (result.exit_code, result.stderr.splitlines()) == (2, [f"{path}: is not a regular file; name a TOML recipe file"])


def test_set_values_and_key_paths_are_bounded_in_depth(tmp_path, images):
    recipe = write(tmp_path / "r.toml", RECIPE.format(data=images, on_bad_image="error", cache=tmp_path / "cache"))
    deep_value = CliRunner().invoke(mmcore_group, ["show", str(recipe), "--set", "train.x=" + "[" * 100_000])
    assert (deep_value.exit_code, deep_value.stderr.splitlines()) == (
        2, ["--set train.x: the value is nested more than 32 levels deep (with its key path)"]
    )
    key = "a" + ".a" * 100_000
    deep_key = CliRunner().invoke(mmcore_group, ["show", str(recipe), "--set", f"{key}=1"])
    assert (deep_key.exit_code, deep_key.stderr.splitlines()) == (
        2, [f"--set {key[:60]}...: a key path of 100001 parts; recipe keys nest at most 32 deep"]
    )


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "{missing}", "{csv}", "-o", "{blocker}/scored.csv"],
        ["eval", "{missing}", "--out", "{blocker}/eval"],
        ["export", "{missing}", "--out", "{blocker}/bundle"],
        ["compare", "{missing}", "--out", "{blocker}/table"],
        ["ocr", "{csv}", "-o", "{blocker}/ocr.csv"],
        ["new-plugin", "mynet", "--kind", "vision", "--dir", "{blocker}/plugin"],
    ],
    ids=["predict", "eval", "export", "compare", "ocr", "new-plugin"],
)
def test_an_output_path_under_a_file_is_one_line_before_any_work(tmp_path, command):
    """A 41-line FileExistsError after all the scoring; now said first: the run directory given does not even
    exist, and the output path is what is named (``tune``: tests/test_tune.py)."""
    blocker = write(tmp_path / "blocker", "a file where a folder is needed\n")
    csv_path = write(tmp_path / "in.csv", HEADER + "a.jpg,True,\n")
    args = [a.format(missing=tmp_path / "missing", csv=csv_path, blocker=blocker) for a in command]
    result = CliRunner().invoke(mmcore_group, args)
    out = Path(args[args.index("-o" if "-o" in args else "--out" if "--out" in args else "--dir") + 1])
    option = "-o" if "-o" in args else "--dir" if "--dir" in args else "--out"
    what = {"predict": "predictions CSV", "eval": "evaluation folder", "export": "bundle folder",
            "compare": "comparison folder", "ocr": "OCR output CSV", "new-plugin": "plugin folder"}[command[0]]
    assert (result.exit_code, result.stderr.splitlines()) == (
        4, [f"{out}: cannot write the {what}: {blocker} is a file, not a folder; give {option} a path whose parents are folders"]
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mynet\n", "new-plugin: name 'mynet\\n' must be lowercase letters and digits, words joined by single underscores "
                    "(like my_encoder): it becomes the component name in recipes"),
        ("n" * 300, f"new-plugin: name {'n' * 20!r}... is 300 characters long; at most 64 (it becomes file and folder names)"),
    ],
    ids=["trailing_newline", "300_characters"],
)
def test_new_plugin_refuses_a_trailing_newline_and_an_overlong_name(tmp_path, name, expected):
    """The name regex's ``$`` let "mynet\\n" through (file names with a newline, an invalid pyproject.toml);
    300 characters were a "File name too long" traceback."""
    result = CliRunner().invoke(mmcore_group, ["new-plugin", name, "--kind", "vision", "--dir", str(tmp_path / "p")])
    assert (result.exit_code, result.stderr.splitlines()) == (2, [expected])
    assert not (tmp_path / "p").exists()


def test_a_component_name_with_a_trailing_newline_is_refused_at_registration():
    import attrs

    from mmcore.errors import MmcoreError
    from mmcore.plugins.registry import Registry

    @attrs.frozen
    class Params:
        pass

    with pytest.raises(MmcoreError, match=r"^pkg: vision encoder name 'net\\n' must match \[a-z0-9_\]\+$"):
        Registry().add("vision", "net\n", object, Params, "pkg")
