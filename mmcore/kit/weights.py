"""Loading pretrained weights with an error a user can act on."""

from mmcore.errors import MmcoreError

#: what every failed download tells the user to do
WEIGHTS_HINT = (
    "; download them where you have network and set params.weights to that local directory, "
    "or set params.pretrained = false for random weights"
)


class WeightsError(MmcoreError):
    """Pretrained weights could not be loaded."""


def load_pretrained(loader, model_id, *, component, **kwargs):
    """``loader(model_id, **kwargs)``, turning a failed download into one actionable line."""
    try:
        return loader(model_id, **kwargs)
    except Exception as exc:  # network, missing files, auth: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{component}: could not load weights {model_id!r} ({reason[:160]}){WEIGHTS_HINT}") from exc
