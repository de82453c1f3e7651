"""Where the text of a scored row comes from: one rule for ``mmcore serve`` and the Python API.

A model that reads text (``multimodal``, ``text_only``) is never scored with text silently
missing. Scoring it needs a text source, chosen before the first row:

- ``required``: the caller sends each row's text (a row without text is refused);
- OCR: an engine reads the text from the image when a row comes without (the run's
  ``data.ocr``, or one named by the caller);
- ``optional``: a row without text is scored with empty text, and its answer says so.

:func:`text_rule` refuses a model that reads text when none of the three is given;
:meth:`TextRule.settle` gives each row its text and its ``text_source``: ``client``,
``ocr``, ``none-optional`` (empty, accepted by ``optional``) or ``unused`` (a
``vision_only`` model reads no text).
"""

from __future__ import annotations

import attrs

from mmcore.errors import DataError, MmcoreError

CLIENT = "client"
OCR = "ocr"
NONE_OPTIONAL = "none-optional"
UNUSED = "unused"
#: every value of an answer's ``text_source``
TEXT_SOURCES = (CLIENT, OCR, NONE_OPTIONAL, UNUSED)
#: what the caller may say about rows without text (``mmcore serve --text``)
TEXT_MODES = ("required", "optional")

#: how the command line names the three sources (the Python API passes its own words)
CLI_OPTIONS = (
    "--text required (each request sends its text)",
    "--ocr ENGINE (read the text from the image)",
    f'--text optional (score empty text; each answer says text_source "{NONE_OPTIONAL}")',
)


class TextSourceError(MmcoreError):
    """A model that reads text was asked to score with no text source (a usage mistake: exit 2)."""

    exit_code = 2


class MissingTextError(DataError):
    """One row without text where the rule requires it (over HTTP: a 422 naming ``text``)."""


def has_text(text):
    """Whether ``text`` carries anything to read (None, "" and whitespace do not)."""
    return text is not None and bool(text.strip())


@attrs.frozen(kw_only=True)
class TextRule:
    """The settled text source of one served model (see the module docstring)."""

    #: the model reads text (not ``vision_only``)
    reads_text: bool
    #: an OCR engine reads rows sent without text
    ocr: bool
    #: a row with neither text nor OCR is scored with empty text (``--text optional``)
    optional: bool

    def wants_ocr(self, text):
        """Whether a row with this ``text`` needs its image read by OCR."""
        return self.reads_text and self.ocr and not has_text(text)

    def settle(self, text, read_ocr=None):
        """``(text, text_source)`` of one row; ``read_ocr()`` (None without an image) reads its image.

        Raises :class:`MissingTextError` for a row the rule cannot give text to.
        """
        if not self.reads_text:
            return text or "", UNUSED
        if has_text(text):
            return text, CLIENT
        if self.ocr and read_ocr is not None:
            return read_ocr(), OCR
        if self.optional:
            return "", NONE_OPTIONAL
        if self.ocr:
            raise MissingTextError("missing (send it, or send an image for OCR to read it from)")
        raise MissingTextError("missing (this model reads text: send it with each image)")

    def describe(self):
        """One phrase for logs and ``/metadata``: where rows get their text."""
        if not self.reads_text:
            return "unused (the model reads no text)"
        fallback = "empty text (marked none-optional)" if self.optional else "refused"
        return f"client, else OCR, else {fallback}" if self.ocr else f"client, else {fallback}"


def text_rule(modality, *, ocr=False, mode=None, options=CLI_OPTIONS, where=""):
    """The :class:`TextRule` of a model of ``modality`` given an OCR engine (``ocr``) and ``mode``.

    ``mode``: None (not said), ``"required"`` or ``"optional"``. A model that reads text with
    no OCR and no mode is refused with one line (prefixed by ``where``) listing ``options``,
    the three ways to give it text.
    """
    if mode not in (None, *TEXT_MODES):
        raise ValueError(f"text mode must be one of {', '.join(TEXT_MODES)} (got {mode!r})")
    reads_text = modality != "vision_only"
    if reads_text and not ocr and mode is None:
        first, second, third = options
        prefix = f"{where}: " if where else ""
        raise TextSourceError(
            f"{prefix}this {modality} model reads text, and nothing gives it text: choose {first}, {second} or {third}"
        )
    return TextRule(reads_text=reads_text, ocr=bool(ocr), optional=mode == "optional")
