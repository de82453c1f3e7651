"""The ``none`` text encoder: no text branch (vision_only runs)."""


from mmcore.interfaces import NoParams
from mmcore.plugins.hookspecs import hookimpl


def build_none(params):
    return None


@hookimpl
def register_text_encoders(register):
    register("none", build_none, NoParams)
