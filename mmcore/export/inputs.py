"""How a bundle's host turns an image and a text into the graph's inputs: ``inputs.json``.

Bundle format 4 keeps both halves in one file (a model that does not read a modality has no key
for it)::

    {"vision": {"class": "mmcore/Preprocessing", "fields": {...}, "describe": {...}},
     "text": {"name": "labse", "prefix": "", "max_length": 256, "inputs": ["input_ids", ...]}}

``vision`` is the preprocessing as data (:func:`mmcore.export.bundle.describe_preprocessing`),
``text`` the text side (:mod:`mmcore.export.text`; tokenizer folders stay beside it). Formats 1
to 3 held the same two objects in ``preprocessing.json`` and ``text.json``; :func:`read_host_inputs`
opens either layout, checking each against its schema and rebuilding classes by registry name only.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from mmcore.export import bundle as B
from mmcore.export import schema as S


@attrs.frozen(eq=False)
class HostInputs:
    """A bundle's host side, read back and checked: the preprocessing and the text side (None
    where the model does not read that modality)."""

    preprocessing: object = None
    text: object = None


def describe_inputs(*, vision=None, text=None):
    """``inputs.json``'s data from the described preprocessing and text side (either may be None)."""
    return {key: value for key, value in (("vision", vision), ("text", text)) if value is not None}


def read_host_inputs(folder, registry, *, bundle_format, vision, text):
    """The host side of the bundle in ``folder`` (of ``bundle_format``) for a model that reads
    images (``vision``) and/or text (``text``); every problem is one line naming the file and key."""
    from mmcore.export.text import HostText

    folder = Path(folder)
    if bundle_format <= B.SPLIT_INPUTS_FORMAT:
        vision_data, text_info, vision_source, text_source = _read_split(folder, vision=vision, text=text)
    else:
        path = folder / B.INPUTS
        info = S.structure_file(S.read_json(path, what="the inputs description"), S.InputsInfo, path=path)
        for key, wanted, value, reads in (("vision", vision, info.vision, "images"), ("text", text, info.text, "text")):
            if wanted and value is None:
                raise S.BundleError(f"{path}: {key}: missing (the model reads {reads}); export the run again")
        vision_data, text_info = info.vision, info.text
        vision_source, text_source = f"{path}: vision", f"{path}: text"
    preprocessing = B.rebuild_preprocessing(vision_data, registry, source=vision_source) if vision else None
    host_text = HostText(folder, text_info, registry, source=text_source) if text else None
    return HostInputs(preprocessing=preprocessing, text=host_text)


def _read_split(folder, *, vision, text):
    """Formats 1 to 3: ``preprocessing.json`` and ``text.json``, each read only when the model needs it."""
    vision_data = text_info = None
    vision_source, text_source = folder / B.PREPROCESSING, folder / B.TEXT
    if vision:
        vision_data = S.read_json(vision_source, what="the preprocessing")
    if text:
        text_info = S.structure_file(S.read_json(text_source, what="the text side"), S.TextInfo, path=text_source)
    return vision_data, text_info, vision_source, text_source
