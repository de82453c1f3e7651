"""Which package provides each component name the repository's own plugins register.

Data only, for the hint of an unknown name: ``minilm`` is not installed, so the message can say
``pip install mmcore-text-sentence-transformers`` instead of guessing a folder. Kept in step
with the README's plugin table (tests/test_registry.py checks it against the installed plugins).
"""

from __future__ import annotations

KNOWN = {
    "vision": {
        "mmcore-vision-siglip2": ("siglip2_so400m", "siglip2_base", "siglip2_naflex_so400m", "siglip2_naflex_base"),
        "mmcore-vision-resnet": ("resnet18", "resnet50", "resnet101"),
        "mmcore-vision-vgg": ("vgg16",),
        "mmcore-vision-vit": ("vit", "vit_base", "vit_large"),
        "mmcore-vision-efficientnet": ("efficientnet",),
        "mmcore-vision-timm": ("timm",),
    },
    "text": {
        "mmcore-text-sentence-transformers": ("labse", "e5_large", "minilm", "sentence_transformer"),
        "mmcore-text-bge-m3": ("bge_m3",),
    },
    "ocr": {"mmcore-ocr-tesseract": ("tesseract",)},
}


def providing_package(kind, name):
    """The distribution that registers ``name`` as a ``kind`` component, or None."""
    for package, names in KNOWN.get(kind, {}).items():
        if name in names:
            return package
    return None


def install_hint(kind, name):
    """One sentence for an unknown-name message: the package that has ``name``, or None."""
    package = providing_package(kind, name)
    if package is None:
        return None
    folder = package.removeprefix("mmcore-")
    return f"{name!r} is provided by {package}: pip install {package} (from a checkout: pip install ./plugins/{folder})"
