"""``mmcore demo``: a small, fair ad-vs-not dataset made on the spot (no download), and the demo
recipe trained on it; the dataset is the tests' too.

Ads are rendered offers: a banner colour, a headline ("50% OFF"), a price, a call to action,
sometimes a product shape; their ``text_info`` is what OCR would read, occasionally empty
(OCR misses) or garbled. Non-ads are ordinary pictures (gradient skies, landscapes, shapes,
noise "photos") whose text is usually empty and sometimes a caption, a sign or a market price.
Hard cases on both sides (a plain ad whose OCR found nothing, a market photo with a price)
keep the task from being trivial.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HEADLINES = ["50% OFF", "SALE", "BUY 1 GET 1", "FREE SHIPPING", "LIMITED OFFER", "NEW ARRIVAL",
             "BLACK FRIDAY", "MEGA DEAL", "CLEARANCE", "HOT PRICE", "오늘만 특가", "할인 행사"]
ACTIONS = ["Shop now", "Order today", "Click here", "Call 1588-0000", "Visit our store", "Sign up free"]
PRODUCTS = ["shoes", "phones", "laptops", "coffee", "watches", "vitamins", "loans", "insurance"]
CAPTIONS = ["family trip to the beach", "my dog in the park", "happy birthday", "sunset",
            "view from the office", "grandma's garden", "wedding photo", "lecture notes page 3"]
SIGNS = ["OPEN", "EXIT", "Main St", "CAFE", "NO PARKING"]


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _garble(text, rng, rate=0.15):
    chars = list(text)
    for i in range(len(chars)):
        if rng.random() < rate:
            chars[i] = rng.choice("il1|0O.,'")
    return "".join(chars)


def _ad(rng, size):
    from PIL import Image, ImageDraw

    if rng.random() < 0.25:  # a plain ad: muted colours, no banner, small type
        bg = tuple(rng.randint(90, 200) for _ in range(3))
    else:
        bg = tuple(rng.randint(150, 255) if i == rng.randint(0, 2) else rng.randint(0, 120) for i in range(3))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    w, h = size
    headline = rng.choice(HEADLINES)
    product = rng.choice(PRODUCTS)
    price = f"${rng.randint(1, 99)}.{rng.choice(['99', '49', '00'])}"
    action = rng.choice(ACTIONS)
    fg = tuple(255 - c for c in bg)
    if rng.random() < 0.5:  # banner stripe
        y = rng.randint(0, h // 3)
        draw.rectangle([0, y, w, y + h // 5], fill=(255, 230, 0))
    draw.text((rng.randint(2, w // 6), rng.randint(2, h // 6)), headline, fill=fg, font=_font(max(10, h // 7)))
    draw.text((rng.randint(2, w // 4), h // 2), f"{product} {price}", fill=fg, font=_font(max(8, h // 10)))
    draw.text((rng.randint(2, w // 4), int(h * 0.78)), action, fill=fg, font=_font(max(8, h // 12)))
    if rng.random() < 0.4:  # a product blob
        x, y = rng.randint(w // 2, w - 20), rng.randint(h // 4, h - 20)
        draw.ellipse([x, y, x + w // 5, y + h // 5], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    text = f"{headline} {product} {price} {action}"
    roll = rng.random()
    if roll < 0.2:
        text = ""  # OCR found nothing
    elif roll < 0.45:
        text = _garble(text, rng, 0.3)
    return img, text


def _photo(rng, size):
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    top = tuple(rng.randint(60, 230) for _ in range(3))
    bottom = tuple(rng.randint(0, 160) for _ in range(3))
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / max(1, h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randint(1, 6)):  # hills, trees, sun, people-ish blobs
        x, y = rng.randint(0, w), rng.randint(h // 3, h)
        r = rng.randint(w // 12, w // 4)
        shape = rng.choice([draw.ellipse, draw.rectangle])
        shape([x - r, y - r, x + r, y + r], fill=tuple(rng.randint(0, 200) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0)))
    text = ""
    roll = rng.random()
    if roll < 0.2:
        text = rng.choice(CAPTIONS)
        ImageDraw.Draw(img).text((4, h - 14), text, fill=(255, 255, 255), font=_font(10))
    elif roll < 0.32:
        text = rng.choice(SIGNS)  # a shop sign in a street photo: text, but not an ad
        ImageDraw.Draw(img).text((w // 3, h // 3), text, fill=(250, 250, 250), font=_font(max(10, h // 8)))
    elif roll < 0.42:
        text = f"{rng.choice(['apples', 'fish', 'bread', 'flowers'])} ${rng.randint(1, 9)}"  # a market stall price
        ImageDraw.Draw(img).text((w // 4, h // 2), text, fill=(20, 20, 20), font=_font(max(9, h // 10)))
    elif roll < 0.5:
        text = _garble("~ . , ' ll", rng, 0.5)  # OCR noise on a photo
    return img, text


def make_demo_dataset(out_dir, *, n_train=240, n_val=80, n_test=80, size=(96, 96), seed=0):
    """Write ``images/`` and ``train.csv``/``val.csv``/``test.csv`` (balanced) under ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counter = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        for i in range(n):
            is_ad = i % 2 == 0
            img, text = (_ad if is_ad else _photo)(rng, size)
            name = f"images/{split}_{counter:05d}.jpg"
            counter += 1
            img.save(out_dir / name, quality=90)
            rows.append((name, "True" if is_ad else "False", text))
        rng.shuffle(rows)
        with open(out_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["local_image_path", "label", "text_info"])
            writer.writerows(rows)
    return out_dir


def run_demo(data_dir="demo_data", *, recipe=None, overrides=(), registry=None, progress=True, echo=print):
    """Make the demo dataset in ``data_dir`` (when missing) and train ``recipe`` on it (default: the
    demo recipe, ``recipes/demo.toml`` here, else the one shipped with mmcore); returns the run directory.
    The recipe (and the plugins it names) is checked before any file is written."""
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    recipe = Path(recipe) if recipe else find_recipe("demo.toml")
    data = Path(data_dir)
    loaded = load_recipe(recipe, [f"data.base_dir={str(data.resolve())!r}", *overrides])
    if not (data / "test.csv").is_file():
        echo(f"making the demo dataset in {data}/ ...")
        make_demo_dataset(data)
    return run_training(loaded, recipe_path=recipe, registry=registry, progress=progress, echo=echo)


def find_recipe(name):
    """A shipped recipe: ``recipes/<name>`` in the current directory, else the copy inside the mmcore package."""
    from importlib.resources import files

    from mmcore.errors import MmcoreError

    local = Path.cwd() / "recipes" / name
    if local.is_file():
        return local
    shipped = files("mmcore") / "recipes" / name
    if shipped.is_file():
        return Path(str(shipped))
    raise MmcoreError(f"recipes/{name} not found here nor in the mmcore package; pass --recipe")
