"""mmcore-ocr-tesseract: entry point, params, exact error messages, one real read."""

from __future__ import annotations

import shutil
import stat

import pytest
from mmcore_ocr_tesseract import TesseractEngine, TesseractParams, debian_package
from PIL import Image, ImageDraw, ImageFont

from mmcore import FieldError, MmcoreError
from mmcore.testing import make_registry


def test_entry_point_registers_tesseract(monkeypatch):
    # only this plugin: a broken unrelated plugin must not fail this package's test
    monkeypatch.setenv("MMCORE_LOAD_PLUGINS", "mmcore-ocr-tesseract")
    registry = make_registry(load_entrypoints=True)
    registration = registry.get("ocr", "tesseract")
    assert registration.package == "mmcore-ocr-tesseract"
    assert registration.params_cls is TesseractParams


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"psm": 0}, "must be in [1, 13] (got 0)"),
        ({"psm": 14}, "must be in [1, 13] (got 14)"),
        ({"oem": 4}, "must be in [0, 3] (got 4)"),
        ({"timeout": 0}, "must be > 0 (got 0)"),
    ],
)
def test_bad_params_say_what_is_allowed(kwargs, message):
    with pytest.raises(FieldError) as info:
        TesseractParams(**kwargs)
    assert str(info.value) == message
    assert info.value.field == next(iter(kwargs))


def test_debian_package_names():
    assert debian_package("kor") == "tesseract-ocr-kor"
    assert debian_package("chi_sim") == "tesseract-ocr-chi-sim"
    assert debian_package("script/Hangul") == "tesseract-ocr-script-hang"


def test_missing_program_names_the_debian_package(tmp_path):
    engine = TesseractEngine(TesseractParams(binary=str(tmp_path / "no-tesseract")))
    with pytest.raises(MmcoreError) as info:
        engine.check("eng")
    assert str(info.value) == (
        f"tesseract OCR: program '{tmp_path / 'no-tesseract'}' not found; install the Debian "
        "package tesseract-ocr (apt-get install tesseract-ocr, or scripts/install-ocr-deps.sh)"
    )


@pytest.fixture
def stub_tesseract(tmp_path):
    """A shell script that answers --list-langs like Tesseract with only eng installed."""
    script = tmp_path / "tesseract"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--list-langs" ]; then\n'
        '  echo \'List of available languages in "/usr/share/tesseract-ocr/5/tessdata/" (2):\'\n'
        "  echo eng; echo osd; exit 0\n"
        "fi\n"
        'if [ "$1" = "--version" ]; then echo "tesseract 5.9.9"; exit 0; fi\n'
        "echo \"Failed loading language 'kor'\" >&2; exit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_missing_language_pack_names_the_debian_package(stub_tesseract):
    engine = TesseractEngine(TesseractParams(binary=stub_tesseract))
    engine.check("eng")  # installed: no error
    with pytest.raises(MmcoreError) as info:
        engine.check("eng+kor")
    assert str(info.value) == (
        "tesseract OCR: language pack 'kor' is not installed (have: eng, osd); "
        "install the Debian package tesseract-ocr-kor"
    )
    # the same line when the pack disappears mid-run and tesseract itself fails
    with pytest.raises(MmcoreError, match="install the Debian package tesseract-ocr-kor"):
        engine.read(Image.new("RGB", (8, 8), "white"), "kor")


def test_identity_follows_version_and_params(stub_tesseract):
    a = TesseractEngine(TesseractParams(binary=stub_tesseract))
    b = TesseractEngine(TesseractParams(binary=stub_tesseract, psm=11))
    assert a.identity.startswith("tesseract|tesseract 5.9.9|")
    assert a.identity != b.identity
    assert a.identity == TesseractEngine(TesseractParams(binary=stub_tesseract, timeout=5)).identity


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract program not installed")
def test_reads_english_text():
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 40)
    image = Image.new("RGB", (700, 120), "white")
    ImageDraw.Draw(image).text((30, 30), "Cheap watches online", font=font, fill="black")
    text = TesseractEngine(TesseractParams()).read(image, "eng")
    assert " ".join(text.split()) == "Cheap watches online"
