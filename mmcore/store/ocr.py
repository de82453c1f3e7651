"""The OCR tenant: the text an OCR engine read in an image, so each image is read once across runs.

Layout: ``<cache>/ocr/<image sha1>-<engine key>.json``, one small JSON file per (image content,
engine identity, language) holding ``{"image_sha1", "engine", "lang", "text"}``. The engine key
is the sha1 of :data:`OCR_VERSION`, the engine's identity and the language, so another engine,
version or language reads the image again. An entry is used only when what it says matches its
name: a copied or renamed entry is never another image's text. A damaged one is read again
(and :func:`verify_ocr` lists it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from mmcore.io import write_text
from mmcore.store.root import short_error

#: the tenant's folder under the cache root
OCR_DIR = "ocr"
#: part of every entry's name: bump it when what an entry means changes
#: (2: keyed by the sha1 of the image, which the feature cache uses, instead of a sha256)
OCR_VERSION = 2
#: an entry larger than this is not read (an ad's text is a few hundred bytes)
MAX_ENTRY_BYTES = 1 << 20
_ENTRY_NAME = re.compile(r"^(?P<image>[0-9a-f]{40})-(?P<engine>[0-9a-f]{16})\.json$")
_FIELDS = ("image_sha1", "engine", "lang", "text")


def engine_key(identity, lang):
    """The part of an entry's name that says which engine, language and format version read it."""
    return hashlib.sha1(f"{OCR_VERSION}\n{identity}\n{lang}".encode()).hexdigest()[:16]


def read_entry(path):
    """``(entry dict, None)`` for a sound entry whose contents match its name, else ``(None, problem)``
    (``problem`` None: there is no such file)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_ENTRY_BYTES:
                return None, f"{size} bytes, more than an OCR text takes ({MAX_ENTRY_BYTES})"
            entry = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"unreadable: {short_error(exc)}"
    if not isinstance(entry, dict) or not all(isinstance(entry.get(field), str) for field in _FIELDS):
        return None, f"not an OCR text (it needs the string fields {', '.join(_FIELDS)})"
    name = _ENTRY_NAME.match(path.name)
    if name is None:
        return None, "not an OCR text's name (<image sha1>-<engine key>.json)"
    if entry["image_sha1"] != name["image"] or engine_key(entry["engine"], entry["lang"]) != name["engine"]:
        return None, "its contents are another image's or engine's text than its name says"
    return entry, None


class OcrTexts:
    """The OCR texts cached under ``root`` (the cache directory)."""

    def __init__(self, root):
        self.dir = Path(root) / OCR_DIR

    def path(self, image_key, identity, lang):
        """Where the text of the image with content key ``image_key`` (sha1 bytes) is cached."""
        return self.dir / f"{image_key.hex()}-{engine_key(identity, lang)}.json"

    def get(self, image_key, identity, lang):
        """The cached text, or None (no entry, or a damaged one: the image is read again)."""
        entry, _ = read_entry(self.path(image_key, identity, lang))
        return entry["text"] if entry is not None else None

    def put(self, image_key, identity, lang, text):
        """Cache ``text`` for this image, engine and language (atomically; one line if it cannot be written)."""
        entry = {"image_sha1": image_key.hex(), "engine": identity, "lang": lang, "text": text}
        write_text(self.path(image_key, identity, lang), json.dumps(entry, ensure_ascii=False))


def verify_ocr(root, checkup):
    """The tenant's check: every entry readable, bounded, and what its name says."""
    folder = Path(root) / OCR_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        entry, problem = read_entry(path)
        if entry is not None:
            checkup.count("ocr_texts")
        elif problem is not None:
            checkup.problem(f"{path}: damaged OCR text ({problem})", path)
