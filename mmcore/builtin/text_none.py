"""The ``none`` text encoder: no text branch (vision_only runs)."""

import attrs

from ..hookspecs import hookimpl


@attrs.frozen(kw_only=True)
class NoParams:
    """No parameters."""


def build_none(params):
    return None


@hookimpl
def register_text_encoders(register):
    register("none", build_none, NoParams)
