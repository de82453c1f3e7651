"""Tesseract OCR for mmcore: the ``tesseract`` program, fed PNG bytes on stdin."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import attrs

from mmcore import MmcoreError, OcrEngine, hookimpl, identity_string, in_range, positive

INSTALL_HINT = "(apt-get install tesseract-ocr, or scripts/install-ocr-deps.sh)"


class TesseractMissingError(MmcoreError):
    """The tesseract binary or a language pack is not installed."""


@attrs.frozen(kw_only=True)
class TesseractParams:
    """``psm``: page segmentation mode (3 = automatic, 6 = one block, 11 = sparse text);
    ``oem``: engine mode (3 = default); ``timeout``: seconds per image; ``binary``: program."""

    psm: int = attrs.field(default=3, validator=in_range(1, 13, high_inclusive=True))
    oem: int = attrs.field(default=3, validator=in_range(0, 3, high_inclusive=True))
    timeout: float = attrs.field(default=60.0, validator=positive)
    binary: str = "tesseract"


def debian_package(lang):
    """The Debian package holding a Tesseract language: ``kor`` -> ``tesseract-ocr-kor``."""
    if lang.startswith("script/"):
        return "tesseract-ocr-script-" + lang.split("/", 1)[1].lower()[:4]
    return "tesseract-ocr-" + lang.lower().replace("_", "-")


class TesseractEngine(OcrEngine):
    """Runs ``tesseract stdin stdout -l LANG --psm N --oem N`` once per image."""

    name = "tesseract"

    def __init__(self, params: TesseractParams):
        self.params = params
        self._version = None

    def _program(self):
        program = shutil.which(self.params.binary)
        if program is None:
            raise TesseractMissingError(
                f"tesseract OCR: program {self.params.binary!r} not found; "
                f"install the Debian package tesseract-ocr {INSTALL_HINT}"
            )
        return program

    def _run(self, args, **kwargs):
        env = dict(os.environ)
        # one thread per process: mmcore parallelizes over images, OpenMP threads would fight
        env.setdefault("OMP_THREAD_LIMIT", "1")
        return subprocess.run(
            [self._program(), *args], capture_output=True, env=env, check=False, **kwargs
        )

    @property
    def version(self):
        """``tesseract 5.3.0`` (first line of ``tesseract --version``)."""
        if self._version is None:
            out = self._run(["--version"], timeout=30)
            text = (out.stdout or out.stderr).decode(errors="replace").strip()
            self._version = text.splitlines()[0] if text else "tesseract (unknown version)"
        return self._version

    def languages(self):
        """Installed language codes (``tesseract --list-langs``)."""
        out = self._run(["--list-langs"], timeout=30)
        text = (out.stdout + out.stderr).decode(errors="replace")
        return {line.strip() for line in text.splitlines()[1:] if line.strip()}

    def check(self, lang):
        """Raise one actionable line when the program or a language pack is missing."""
        installed = self.languages()
        for code in (part for part in lang.split("+") if part):
            if code not in installed:
                have = ", ".join(sorted(installed)) or "none"
                raise TesseractMissingError(
                    f"tesseract OCR: language pack {code!r} is not installed (have: {have}); "
                    f"install the Debian package {debian_package(code)}"
                )

    def read(self, image, lang):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        args = ["stdin", "stdout", "-l", lang, "--psm", str(self.params.psm)]
        args += ["--oem", str(self.params.oem)]
        try:
            out = self._run(args, input=buffer.getvalue(), timeout=self.params.timeout)
        except subprocess.TimeoutExpired:
            seconds = self.params.timeout
            raise RuntimeError(f"tesseract took longer than timeout={seconds}s") from None
        if out.returncode != 0:
            err = out.stderr.decode(errors="replace").strip()
            if "Failed loading language" in err:
                self.check(lang)  # raises the install hint for the missing pack
            last = err.splitlines()[-1] if err else "no message"
            raise RuntimeError(f"tesseract exited with status {out.returncode}: {last}")
        return out.stdout.decode("utf-8", errors="replace")

    @property
    def identity(self):
        return identity_string(
            self.name, self.version, None, {"psm": self.params.psm, "oem": self.params.oem}
        )

    def __getstate__(self):
        return {"params": self.params, "_version": self._version}


def make_tesseract(params):
    return TesseractEngine(params)


@hookimpl
def register_ocr_engines(register):
    register("tesseract", make_tesseract, TesseractParams)
