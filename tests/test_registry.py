"""The plugin system: hooks, entry points, names, and the errors users see."""

import attrs
import pytest

from mmcore import hookimpl
from mmcore.plugins import hookspecs
from mmcore.plugins.hookspecs import hookspec
from mmcore.plugins.kinds import KIND_TABLE, KINDS
from mmcore.plugins.manager import collect, make_plugin_manager, make_registry
from mmcore.plugins.registry import DuplicateComponentError, Registry, UnknownComponentError


def test_builtins_register_through_the_hooks():
    registry = make_registry(load_entrypoints=False)
    assert registry.names("pooling") == ["attention", "cls", "mean"]
    assert registry.names("fusion") == ["concat", "gated", "late"]
    assert registry.names("head") == ["mlp"]
    assert registry.names("loss") == ["bce", "focal"]
    assert registry.names("scheduler") == ["constant", "cosine", "cosine_warmup"]
    assert registry.names("augmentation") == ["none", "strong", "weak"]
    assert registry.names("text") == ["concat", "none"]
    assert registry.get("pooling", "mean").package == "mmcore"


def test_every_kind_has_a_hookspec_and_every_hookspec_a_kind():
    specs = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "mmcore_spec"))
    assert specs == sorted(kind.hook for kind in KIND_TABLE)
    assert getattr(hookspecs, "register_heads").__doc__.startswith(
        "Call ``register(name, factory, params_cls)`` for each head.\n\n``factory(params, in_dim) -> mmcore.Head``"
    )


def test_recipe_component_tables_come_from_the_kind_table():
    from mmcore.recipe.schema import COMPONENT_KINDS, Recipe

    assert set(COMPONENT_KINDS) == set(KINDS) - {"ocr"}
    assert set(COMPONENT_KINDS) <= {field.name for field in attrs.fields(Recipe)}


def test_registry_gets_its_packages_and_broken_plugins_in_its_constructor():
    registry = Registry({"p": ("mmcore-vision-p", "1.2")}, {"mmcore-vision-q": "ImportError: no"})
    assert registry.packages == {"p": ("mmcore-vision-p", "1.2")}
    assert registry.unknown_message("vision", "x").endswith("(not loaded: mmcore-vision-q, ImportError: no)")


def test_installed_plugin_versions_come_from_pluggys_distinfo(monkeypatch):
    monkeypatch.setenv("MMCORE_LOAD_PLUGINS", "mmcore-fake-encoders")
    pm, packages, broken = make_plugin_manager()
    ((plugin, dist),) = pm.list_plugin_distinfo()
    assert pm.get_name(plugin) == "mmcore-fake-encoders"
    assert packages["mmcore-fake-encoders"] == ("mmcore-fake-encoders", dist.version) and broken == {}


class _GrownSpecs:
    """register_heads as a later mmcore might declare it: a second parameter."""

    @hookspec
    def register_heads(self, register, core_version):
        pass


class _OldHeadPlugin:
    @hookimpl
    def register_heads(self, register):  # written before the hook grew
        register("old_head", lambda p, d: None, _P)


class _NewHeadPlugin:
    @hookimpl
    def register_heads(self, core_version, register):  # any order: pluggy calls by keyword
        register(f"head_for_{core_version}", lambda p, d: None, _P)


def test_a_hook_can_gain_a_parameter_without_breaking_a_plugin_that_does_not_take_it():
    import pluggy

    pm = pluggy.PluginManager("mmcore")
    pm.add_hookspecs(_GrownSpecs)
    pm.register(_OldHeadPlugin(), name="old")
    pm.register(_NewHeadPlugin(), name="new")
    pm.check_pending()
    registry = collect(pm, {"old": ("mmcore-head-old", "1"), "new": ("mmcore-head-new", "2")},
                       arguments={"core_version": "v9"})
    assert registry.names("head") == ["head_for_v9", "old_head"]
    assert registry.get("head", "old_head").package == "mmcore-head-old"
    assert registry.get("head", "head_for_v9").package == "mmcore-head-new"


def test_unknown_name_message_has_did_you_mean_installed_and_hint(registry):
    with pytest.raises(UnknownComponentError) as info:
        registry.get("vision", "fake_cnm")
    assert str(info.value) == (
        "unknown vision encoder 'fake_cnm'; did you mean 'fake_cnn'? installed: fake_cnn, fake_vit. "
        "More: pip install the package that provides it (plugins are named mmcore-vision-<name>); "
        "`mmcore plugins` lists what is installed"
    )


def test_unknown_name_without_close_match(registry):
    with pytest.raises(UnknownComponentError) as info:
        registry.get("pooling", "zzz")
    assert str(info.value) == "unknown pooling 'zzz' installed: attention, cls, mean."


@attrs.frozen
class _P:
    pass


class _PluginA:
    @hookimpl
    def register_poolings(self, register):
        register("mean", lambda p, d, c: None, _P)


def test_duplicate_name_names_both_packages():
    with pytest.raises(DuplicateComponentError) as info:
        make_registry(load_entrypoints=False, extra_plugins=[("mmcore-pooling-extra", _PluginA())])
    assert str(info.value) == (
        "pooling 'mean' is registered by both mmcore and mmcore-pooling-extra; uninstall one of them"
    )


class _Misspelled:
    @hookimpl
    def register_vision_encoder(self, register):  # missing the final "s"
        pass


def test_misspelled_hook_is_refused_by_check_pending():
    import pluggy

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(load_entrypoints=False, extra_plugins=[("bad", _Misspelled())])


def test_installed_fake_plugin_is_found_through_its_entry_point(monkeypatch):
    monkeypatch.delenv("MMCORE_LOAD_PLUGINS", raising=False)
    registry = make_registry()
    assert registry.get("vision", "fake_cnn").package == "mmcore-fake-encoders"


def test_load_plugins_env_restricts_loading(monkeypatch):
    monkeypatch.setenv("MMCORE_LOAD_PLUGINS", "mmcore-fake-encoders")
    registry = make_registry()
    assert registry.names("vision") == ["fake_cnn", "fake_vit"]
    monkeypatch.setenv("MMCORE_LOAD_PLUGINS", "")
    assert make_registry().names("vision") == []


def test_two_distributions_with_the_same_entry_point_name_are_refused(monkeypatch):
    import importlib.metadata as md

    from mmcore.plugins import manager as plugins

    class FakeDist:
        def __init__(self, name):
            self.metadata = {"Name": name}
            self.version = "1.0"
            self.entry_points = [md.EntryPoint(name="same", value="json", group="mmcore")]

    monkeypatch.setattr(plugins.importlib.metadata, "distributions", lambda: [FakeDist("pkg-one"), FakeDist("pkg-two")])
    with pytest.raises(Exception) as info:
        plugins._entry_points()
    assert str(info.value) == (
        "entry point 'same' (group 'mmcore') is exposed by both pkg-one and pkg-two; uninstall one of them"
    )


def test_register_requires_attrs_params_and_valid_names():
    class Bad:
        @hookimpl
        def register_heads(self, register):
            register("Bad-Name", lambda p, d: None, _P)

    with pytest.raises(Exception, match=r"head name 'Bad-Name' must match \[a-z0-9_\]\+"):
        make_registry(load_entrypoints=False, extra_plugins=[("bad", Bad())])


def test_a_broken_plugin_is_skipped_with_a_warning_and_named_when_its_kind_is_asked_for(monkeypatch, capsys):
    import importlib.metadata as md

    from mmcore.plugins import manager as plugins

    class BrokenDist:
        metadata = {"Name": "mmcore-vision-broken"}
        version = "0.1"
        entry_points = [md.EntryPoint(name="mmcore-vision-broken", value="no_such_module_xyz", group="mmcore")]

    monkeypatch.setattr(plugins.importlib.metadata, "distributions", lambda: [BrokenDist()])
    monkeypatch.delenv("MMCORE_LOAD_PLUGINS", raising=False)
    registry = make_registry()
    reason = "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    assert capsys.readouterr().err.strip() == (
        f"warning: plugin mmcore-vision-broken failed to load ({reason}); skipped. "
        "Reinstall it, or leave it out with MMCORE_LOAD_PLUGINS"
    )
    assert registry.names("pooling") == ["attention", "cls", "mean"]  # the rest still works
    with pytest.raises(UnknownComponentError) as info:
        registry.get("vision", "broken_net")
    assert str(info.value).endswith(f"(not loaded: mmcore-vision-broken, {reason})")
