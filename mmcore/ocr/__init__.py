"""OCR: fill empty ``text_info`` from the image itself.

- :mod:`.engines`: build and check an engine from the registry, run it over images (a pool).
- :mod:`.fill`: the OCR stage of a run (``data.ocr``), cached by image content.
- :mod:`.batch`: the resumable, parallel, atomic ``mmcore ocr`` command.
"""
