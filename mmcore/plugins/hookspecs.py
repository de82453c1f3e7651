"""Hook specifications: one per component kind, made from :data:`mmcore.plugins.kinds.KIND_TABLE`.

Every hook has the same shape: mmcore hands the plugin a ``register`` callable and the
plugin calls ``register(name, factory, params_cls)`` once per component it provides (vision
encoders and augmentations also say their ``traits=``, :mod:`mmcore.plugins.traits`).
mmcore calls hooks by keyword, so a hook can grow a parameter later without breaking the
plugins that do not take it (pluggy passes each implementation only the arguments it names).
``docs/plugins.md`` documents each hook; a test fails when one is missing there.
"""

import pluggy

from mmcore.plugins.kinds import KIND_TABLE

hookspec = pluggy.HookspecMarker("mmcore")
hookimpl = pluggy.HookimplMarker("mmcore")


def _make_spec(kind):
    def spec(register):
        pass

    spec.__name__ = spec.__qualname__ = kind.hook
    spec.__module__ = __name__
    traits = f", traits={kind.traits.__name__}(...)" if kind.traits else ""
    spec.__doc__ = f"Call ``register(name, factory, params_cls{traits})`` for each {kind.human}.\n\n{kind.contract}\n"
    return hookspec(spec)


for _kind in KIND_TABLE:
    globals()[_kind.hook] = _make_spec(_kind)
del _kind

__all__ = ["hookimpl", "hookspec", *(kind.hook for kind in KIND_TABLE)]
