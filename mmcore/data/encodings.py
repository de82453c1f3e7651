"""Which legacy code page a CSV that is not UTF-8 is in, to say so and how to convert it.

Spreadsheets in East Asian locales save CSVs in their Windows code page. The multi-byte code
pages overlap (a Shift-JIS file often decodes without error as CP949, an EUC-KR one as EUC-JP
or GB18030), so decoding without error is not enough: each candidate must also give the
characters its language is written in. Tried in this order, on a sample of the file:

- Korean (CP949, a superset of EUC-KR): nearly all letters are the 2,350 common Hangul
  syllables of KS X 1001 or its jamo (``ㅋㅋ``), at least half of them syllables (Japanese or
  Chinese bytes read as Korean give rare syllables, hanja, and jamo for hiragana);
- Japanese (CP932 = Windows Shift-JIS, then EUC-JP): kana among the letters, and nearly all
  letters kana or the common (level 1) kanji of JIS X 0208;
- Chinese (GB18030 for simplified, Big5/CP950 for traditional): the one whose letters are
  more often the common (level 1) hanzi of GB 2312 or Big5;
- Windows-1252 (Western European) when none of them fits and it decodes.
"""

from __future__ import annotations

import codecs

import attrs

#: bytes of the file the guess looks at (from the first byte that is not ASCII)
SAMPLE_BYTES = 1 << 16
#: the share of a language's common letters a guess needs
_PLAUSIBLE = 0.8
#: the share of kana among Japanese letters (Chinese read as Japanese has none)
_KANA = 0.1


@attrs.frozen
class Encoding:
    """A code page a CSV may be in: Python's codec, how to name it, ``iconv``'s name for it."""

    codec: str
    label: str
    iconv: str


KOREAN = Encoding("cp949", "CP949/EUC-KR (Korean Windows/Excel)", "CP949")
SHIFT_JIS = Encoding("cp932", "Shift-JIS/CP932 (Japanese Windows/Excel)", "CP932")
EUC_JP = Encoding("euc_jp", "EUC-JP (Japanese)", "EUC-JP")
GB18030 = Encoding("gb18030", "GB18030/GBK (Simplified Chinese Windows/Excel)", "GB18030")
BIG5 = Encoding("cp950", "Big5/CP950 (Traditional Chinese Windows/Excel)", "CP950")
WINDOWS_1252 = Encoding("cp1252", "Windows-1252 (Western European)", "CP1252")


def guess_encoding(data):
    """The :class:`Encoding` ``data`` (bytes that are not UTF-8) is most likely in, or None."""
    start = next((i for i, byte in enumerate(data[:SAMPLE_BYTES]) if byte >= 0x80), 0)
    sample = data[start : start + SAMPLE_BYTES]
    korean = _decode(sample, KOREAN)
    if korean is not None and _share(korean, _hangul_or_jamo) >= _PLAUSIBLE and _share(korean, _common_hangul) >= 0.5:
        return KOREAN
    for japanese in (SHIFT_JIS, EUC_JP):
        text = _decode(sample, japanese)
        if text is not None and _share(text, _kana) >= _KANA and _share(text, _common_japanese) >= _PLAUSIBLE:
            return japanese
    chinese = []
    for encoding, common in ((GB18030, _common_gb), (BIG5, _common_big5)):
        text = _decode(sample, encoding)
        if text is not None:
            chinese.append((_share(text, common), encoding))
    if chinese:
        share, encoding = max(chinese, key=lambda pair: pair[0])  # max keeps the first of a tie
        if share >= _PLAUSIBLE:
            return encoding
    return WINDOWS_1252 if _decode(data, WINDOWS_1252) is not None else None


def _decode(sample, encoding):
    """``sample`` decoded strictly (a character cut at the sample's end is left out), or None."""
    decoder = codecs.getincrementaldecoder(encoding.codec)(errors="strict")
    try:
        return decoder.decode(sample, final=False)
    except UnicodeDecodeError:
        return None


def _share(text, common):
    """The share of ``text``'s letters (neither ASCII nor punctuation or symbols) for which ``common`` holds."""
    letters = [c for c in text if ord(c) >= 0x80 and not _punctuation(c)]
    if not letters:
        return 0.0
    return sum(1 for c in letters if common(c)) / len(letters)


def _punctuation(c):
    code = ord(c)
    return (
        0x80 <= code < 0xC0  # Latin-1 signs
        or 0x2000 <= code < 0x2C00  # general punctuation, symbols, arrows, box drawing
        or 0x3000 <= code < 0x3040  # CJK punctuation
        or 0xFF01 <= code < 0xFF61  # full-width ASCII
        or 0xFFE0 <= code < 0xFFF0  # full-width signs
    )


def _kana(c):
    return 0x3040 <= ord(c) < 0x3100  # full-width hiragana and katakana


def _lead(c, codec):
    """The first byte of ``c`` in ``codec`` (0 when it has no double-byte code there)."""
    try:
        encoded = c.encode(codec)
    except UnicodeEncodeError:
        return 0
    return encoded[0] if len(encoded) == 2 else 0


def _common_hangul(c):
    return 0xAC00 <= ord(c) <= 0xD7A3 and 0xB0 <= _lead(c, "euc_kr") <= 0xC8  # KS X 1001's 2,350


def _hangul_or_jamo(c):
    return _common_hangul(c) or 0x3131 <= ord(c) <= 0x318E  # Hangul compatibility jamo


def _common_japanese(c):
    return _kana(c) or 0xB0 <= _lead(c, "euc_jp") <= 0xCF  # JIS X 0208 level 1 kanji


def _common_gb(c):
    return 0xB0 <= _lead(c, "gb2312") <= 0xD7  # GB 2312 level 1 hanzi


def _common_big5(c):
    return 0xA4 <= _lead(c, "big5") <= 0xC6 and c.encode("big5") <= b"\xc6\x7e"  # Big5 level 1
