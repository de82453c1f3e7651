"""Optional third-party packages: one line saying which extra to install when one is missing.

mmcore itself needs neither transformers nor onnxruntime; what needs them is declared as an
extra of the ``mmcore`` package (``pyproject.toml``), and ``bash scripts/install.sh`` installs
every extra the README uses. A missing one is a :class:`MissingDependency` (exit 1):

    mmcore export needs the onnx package, which is not installed: pip install 'mmcore[export]' (or bash scripts/install.sh)
"""

from __future__ import annotations

import importlib
import importlib.util

from mmcore.errors import MmcoreError

#: importable module -> (the package pip installs, the mmcore extra that has it)
EXTRAS = {
    "transformers": ("transformers", "text"),
    "sentence_transformers": ("sentence-transformers", "text"),
    "timm": ("timm", "timm"),
    "captum": ("captum", "explain"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "multipart": ("python-multipart", "serve"),
    "prometheus_client": ("prometheus-client", "serve"),
    "optuna": ("optuna", "tune"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow-skinny", "mlflow"),
    "webdataset": ("webdataset", "webdataset"),
    "braceexpand": ("braceexpand", "webdataset"),
    "pyarrow": ("pyarrow", "parquet"),
    "cleanlab": ("cleanlab", "quality"),
    "sklearn": ("scikit-learn", "quality"),
}
#: extra -> the modules a command of it imports (checked together, before the command's work starts)
EXTRA_MODULES = {
    "export": ("onnx", "onnxruntime"),
    "serve": ("onnx", "onnxruntime", "fastapi", "uvicorn", "multipart", "prometheus_client"),
    "tune": ("optuna",),
    "explain": ("captum",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "webdataset": ("webdataset", "braceexpand"),
    "quality": ("cleanlab", "sklearn"),
}
#: the extras ``bash scripts/install.sh`` installs (the README's first command)
INSTALL_SCRIPT_EXTRAS = ("export", "serve", "tune", "explain", "mlflow", "quality")


class MissingDependency(MmcoreError):
    """An optional package a component or command needs is not installed (exit 1)."""


def missing_line(module, what):
    """``{what} needs the {package} package, which is not installed: pip install 'mmcore[extra]'``."""
    package, extra = EXTRAS.get(module, (module, None))
    if extra is None:
        hint = f"pip install '{package}'"
    else:
        hint = f"pip install 'mmcore[{extra}]'"
        if extra in INSTALL_SCRIPT_EXTRAS:
            hint += " (or bash scripts/install.sh)"
    return f"{what} needs the {package} package, which is not installed: {hint}"


def require(module, what):
    """Import ``module`` or raise :class:`MissingDependency`, one line naming what needs it and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(missing_line(module, what)) from None


def require_extra(extra, what):
    """Raise the first missing module's line unless every module of ``extra`` is installed.

    Found, not imported: the command imports each where it uses it (``mmcore serve`` of a bundle
    checked on this machine never imports ``onnx``, 0.7 s of imports).
    """
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that is missing, or a module without a spec
            found = False
        if not found:
            raise MissingDependency(missing_line(module, what))
