"""Loading pretrained weights with an error a user can act on."""

from pathlib import Path

from mmcore.errors import MmcoreError

#: what a failed download tells the user to do
WEIGHTS_HINT = (
    "; download them where you have network and set params.weights to that local directory, "
    "or set params.pretrained = false for random weights"
)
#: suffixes that make ``params.weights`` a file name rather than a hub or library id
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


class WeightsError(MmcoreError):
    """Pretrained weights could not be loaded."""


def is_local_path(weights):
    """True when ``params.weights`` names a file or directory rather than a hub/library id."""
    if weights.startswith("hf-hub:"):
        return False
    path = Path(weights).expanduser()
    return (
        "/" in weights
        or "\\" in weights
        or weights.startswith(("~", "."))
        or path.suffix in WEIGHT_FILE_SUFFIXES
        or path.exists()
    )


def local_weights_hint(path):
    """What a local weights path that failed to load tells the user: the path that was tried."""
    tried = Path(path).expanduser().resolve()
    return (
        f"; the path tried was {tried}: set params.weights to a weights file or a folder holding one, "
        "or set params.pretrained = false for random weights"
    )


def load_pretrained(loader, model_id, *, component, **kwargs):
    """``loader(model_id, **kwargs)``, turning a failed load into one actionable line.

    A hub id that fails says how to work offline; a local path says which path was tried.
    """
    try:
        return loader(model_id, **kwargs)
    except Exception as exc:  # network, missing files, auth: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = local_weights_hint(model_id) if is_local_path(str(model_id)) else WEIGHTS_HINT
        raise WeightsError(f"{component}: could not load weights {model_id!r} ({reason[:160]}){hint}") from exc
