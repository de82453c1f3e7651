"""mmcore: train binary classifiers of ad images from the image and its OCR text."""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl"]
