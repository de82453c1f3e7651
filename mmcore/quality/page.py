"""The shell both quality pages share: the run report's style (:mod:`mmcore.evaluation.report`)
plus a page's own rules and scripts, all inline, so a page opens offline from its folder."""

from __future__ import annotations

import html

from mmcore.evaluation.report import STYLE, THUMB_SIZE
from mmcore.io import write_text


def write_page(path, *, title, body, style="", scripts=(), thumb_size=THUMB_SIZE):
    """Write one self-contained HTML page (``body``: a list of HTML fragments) atomically; return its Path."""
    e = html.escape
    document = "\n".join([
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>", f"<title>{e(str(title))}</title>",
        f"<style>{STYLE.replace('THUMB', str(int(thumb_size)))}{style}</style>", "</head><body>", *body,
        *(f"<script>{script}</script>" for script in scripts), "</body></html>",
    ])
    return write_text(path, document)
