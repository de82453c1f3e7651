"""The shipped recipes, the documented commands and the installed encoders, end to end.

Everything runs offline: the default recipe trains with tiny random-weight miniatures of its
own encoders (SigLIP2 SO400M, LaBSE) through the real CLI; the hub ids are checked by
intercepting the download each encoder asks for.
"""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from click.testing import CliRunner

from mmcore.cli.main import cli as mmcore_cli_group
from mmcore.evaluation.comparison import flatten
from mmcore.recipe import parse_override

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))
DEFAULT = REPO / "recipes" / "siglip_labse_gmu.toml"
MISSION = REPO.parent / "shared" / "docs" / "MISSION.md"
ENCODERS_DOC = REPO / "docs" / "encoders.md"

#: the component table of the mission: every name must be installed
VISION_NAMES = [
    "siglip2_so400m", "siglip2_base", "siglip2_naflex_so400m", "siglip2_naflex_base",
    "resnet50", "resnet101", "vgg16", "vit", "vit_base", "vit_large", "efficientnet",
]
TEXT_NAMES = ["labse", "bge_m3", "e5_large", "none"]


def invoke(*args, env=None):
    """The real ``mmcore`` command line, in this process (no interpreter start-up to pay)."""
    result = CliRunner().invoke(mmcore_cli_group, [str(a) for a in args], env=env)
    if result.exit_code != 0:
        import traceback

        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        raise AssertionError(f"mmcore {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}\n{trace}")
    return result


def show(*args, env=None):
    """``mmcore show ...`` -> the resolved recipe."""
    return tomllib.loads(invoke("show", *args, env=env).stdout)


# ---------------------------------------------------------------- (a) recipes resolve


#: what each preset changes relative to the default recipe (besides experiment/description)
PRESET_CHANGES = {
    "directFT_lightning_base.toml": {"train.freeze_backbone": False, "train.finetune_layers": 6},
    "directFT_lightning_1_allLayers_mean.toml": {
        "train.freeze_backbone": False, "train.finetune_layers": -1, "pooling.name": "mean",
    },
    "siglip_lora.toml": {"train.lora.enabled": True, "train.lora.rank": 32, "train.lora.alpha": 32},
    "siglip_vision_only.toml": {"text.name": "none", "train.modality": "vision_only"},
}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_resolves(recipe):
    resolved = show(recipe, env={"DATA_DIR": "/data"})
    assert resolved["experiment"] == recipe.stem
    assert resolved["vision"]["name"] and resolved["text"]["name"]


@pytest.mark.parametrize("preset", sorted(PRESET_CHANGES))
def test_presets_change_only_what_they_say(preset):
    default = flatten(show(DEFAULT))
    resolved = flatten(show(REPO / "recipes" / preset))
    # a component whose name changed has another params class: its params are not compared
    renamed = {key.split(".")[0] for key in default if key.endswith(".name") and default[key] != resolved.get(key)}
    changed = {
        key: resolved.get(key)
        for key in set(default) | set(resolved)
        if default.get(key) != resolved.get(key)
        and key not in ("experiment", "description")
        and not (key.split(".")[0] in renamed and ".params." in key)
    }
    assert changed == PRESET_CHANGES[preset]
    assert resolved["train.backbone_lr"] == 1e-5  # the original fine-tuning LR, kept by every preset


def documented_commands():
    """Every inline ``mmcore run|show recipes/...`` command in docs/encoders.md."""
    text = ENCODERS_DOC.read_text(encoding="utf-8")
    return sorted(set(re.findall(r"`(mmcore (?:run|show) recipes/[^`]+)`", text)))


def test_docs_list_every_original_usage_line():
    seed = REPO.parent / "shared" / "seed" / "seed-readme.ko.md"
    if not seed.is_file():
        pytest.skip(f"{seed} not present")
    usage = seed.read_text(encoding="utf-8").split("## Usage", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in usage.splitlines() if line.strip().startswith("python train.py")]
    doc = ENCODERS_DOC.read_text(encoding="utf-8")
    assert len(lines) >= 15
    missing = [line for line in lines if f"`{line}`" not in doc]
    assert not missing, f"docs/encoders.md lacks: {missing}"


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_resolves_to_what_it_sets(command):
    words = shlex.split(command)[2:]  # drop "mmcore run"
    resolved = flatten(show(*words))
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    for item in sets:
        parts, value = parse_override(item)
        assert resolved[".".join(parts)] == value, command


# ---------------------------------------------------------------- (b) the default recipe end to end

LORA_RANK = 4


def tiny_siglip_counts():
    """Parameter counts of the tiny SigLIP2 SO400M, from its config, by hand."""
    from mmcore_vision_siglip2.encoders import ARCHITECTURES, TINY_FIXED

    arch = ARCHITECTURES["tiny"]
    h, m, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    patch, image = TINY_FIXED

    def linear(n_in, n_out):
        return n_in * n_out + n_out

    block = 4 * linear(h, h) + linear(h, m) + linear(m, h) + 2 * 2 * h  # q k v out, mlp, 2 norms
    embeddings = 3 * patch * patch * h + h + (image // patch) ** 2 * h  # patch conv + positions
    final_norm = 2 * h
    return {
        "hidden": h,
        "layers": layers,
        "block": block,
        "final_norm": final_norm,
        "total": embeddings + layers * block + final_norm,
    }


MODES = {
    # LoRA on q/k/v of the top block: rank x (in + out) per adapted linear
    "lora": ["train.lora.enabled=true", "train.lora.target_layers=1", f"train.lora.rank={LORA_RANK}"],
    "top2": ["train.freeze_backbone=false", "train.finetune_layers=2"],
}
#: the LoRA run goes through a real `python -m mmcore` process; the rest runs the same click
#: commands in this process, which saves ~10 s of imports per command on a 2-core machine
SUBPROCESS_RUN = {"lora": True, "top2": False}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_default_recipe_trains_and_eval_reproduces(cli, demo_data, tmp_path, mode):
    out = tmp_path / "run"
    sets = [
        f"data.base_dir={str(demo_data)!r}",
        "data.num_workers=0",
        "vision.params.pretrained=false",
        "vision.params.tiny=true",
        "text.params.tiny=true",  # LaBSE's miniature: the default recipe's own text encoder
        "train.epochs=2",
        "train.batch_size=16",
        f"cache.dir={str(tmp_path / 'cache')!r}",
        "logging.tensorboard=false",
        *MODES[mode],
    ]
    args = [arg for item in sets for arg in ("--set", item)]
    run = cli if SUBPROCESS_RUN[mode] else invoke
    result = run("run", DEFAULT, "--out", out, "--quiet", *args)
    assert "== siglip_labse_gmu ==" in (result.stdout if SUBPROCESS_RUN[mode] else result.output)

    results = json.loads((out / "results.json").read_text())
    trainable = results["trainable_parameters"]
    counts = tiny_siglip_counts()
    if mode == "lora":
        lora = 1 * 3 * LORA_RANK * (counts["hidden"] + counts["hidden"])
        assert trainable["vision"] == {"trainable": lora, "total": counts["total"] + lora}
    else:
        assert counts["layers"] >= 2
        top2 = 2 * counts["block"] + counts["final_norm"]
        assert trainable["vision"] == {"trainable": top2, "total": counts["total"]}
        assert top2 < counts["total"]  # the embeddings stay frozen
    assert trainable["text"]["trainable"] == 0 and trainable["text"]["total"] > 0
    for part in ("pooling", "fusion", "head"):
        assert trainable[part]["trainable"] == trainable[part]["total"] > 0
    # a training vision encoder is never cached; the frozen text encoder is
    assert results["feature_cache"] == {"vision": False, "text": True, "vision_storage": None}  # features not cached: trained
    assert len(results["history"]) == 2

    eval_out = tmp_path / "eval"
    invoke("eval", out, "--data", Path(demo_data) / "test.csv", "--out", eval_out, "--quiet")
    before = json.loads((out / "test_predictions.json").read_text())
    after = json.loads((eval_out / "test_predictions.json").read_text())
    assert [p["path"] for p in after] == [p["path"] for p in before] and len(before) == 32
    np.testing.assert_allclose([p["score"] for p in after], [p["score"] for p in before], atol=1e-5)
    again = json.loads((eval_out / "results.json").read_text())
    assert again["test"]["at_threshold"]["auroc"] == pytest.approx(
        results["test"]["at_threshold"]["auroc"], abs=1e-5
    )


# ---------------------------------------------------------------- (c) per-plugin trainability


def basic_block(c_in, c_out):
    """torchvision BasicBlock params (3x3 convs without bias, BN affine, 1x1 downsample)."""
    params = 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out
    if c_in != c_out:
        params += c_in * c_out + 2 * c_out
    return params


LORA = dict(rank=2, alpha=2, target_layers=1)

PLUGIN_CASES = {
    # tiny resnet18: one BasicBlock per stage (64-128-256-512); top 2 = layer3 + layer4, no final norm
    "resnet18_top2": ("resnet18", 2, None, basic_block(128, 256) + basic_block(256, 512)),
    # tiny vgg16: five one-conv blocks; top 1 = the 64 -> 512 3x3 conv
    "vgg16_top1": ("vgg16", 1, None, 9 * 64 * 512 + 512),
    # tiny vit_base (hidden 32): LoRA on attn.qkv (32 -> 96) and attn.proj (32 -> 32) of the top block
    "vit_base_lora1": ("vit_base", 0, LORA, LORA["rank"] * ((32 + 96) + (32 + 32))),
}


@pytest.mark.parametrize("case", sorted(PLUGIN_CASES))
def test_plugin_trainability_counts_and_frozen_weights(case):
    from mmcore.model.trainability import LoraConfig, apply_trainability
    from mmcore.testing import build

    name, finetune_layers, lora, expected = PLUGIN_CASES[case]
    torch.manual_seed(0)
    encoder = build("vision", name, {"pretrained": False, "tiny": True})
    lora_config = LoraConfig(enabled=True, **lora) if lora else LoraConfig()
    apply_trainability(encoder, freeze_backbone=True, finetune_layers=finetune_layers, lora=lora_config)
    trainable = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    if lora:
        assert all("lora_" in n for n in trainable)
        # lora_B starts at zero: make the adapters matter so lora_A gets a gradient too
        with torch.no_grad():
            for n, p in trainable.items():
                if "lora_B" in n:
                    p.normal_(0, 0.1)

    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in encoder.named_buffers()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    from mmcore.engine.loop import set_train_mode

    holder = torch.nn.Module()
    holder.vision = encoder
    set_train_mode(holder)  # what the engine does: frozen BN statistics stay fixed
    side = encoder.preprocessing.size[0]
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    out = encoder(pixel_values=pixels)
    out.tokens.float().pow(2).mean().backward()
    optimizer.step()

    for n, p in encoder.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == (n in trainable), f"{n}: {'changed' if moved else 'unchanged'}"
    # batch-norm running statistics of frozen blocks do not drift either
    frozen_bn = [n for n in buffers if n.endswith(("running_mean", "running_var"))
                 and not any(n.rsplit(".", 1)[0] + "." in t for t in trainable)]
    for n in frozen_bn:
        assert torch.equal(buffers[n], dict(encoder.named_buffers())[n]), n


# ---------------------------------------------------------------- (d) hub ids


class Requested(Exception):
    """Raised instead of a download, carrying the id the encoder asked for."""


def mission_rows():
    """``{name: row text}`` for the vision/text rows of MISSION.md's component table."""
    rows = {}
    for line in MISSION.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] not in ("vision", "text"):
            continue
        for name in re.findall(r"`([a-z0-9_]+)`", cells[1]):
            rows[name] = f"{cells[1]} {cells[2]}"
    return rows


#: for rows of MISSION.md without a hub id: what the requested weights must name
ARCHITECTURE = {
    "resnet50": "resnet50", "resnet101": "resnet101", "vgg16": "vgg16",
    "vit": "vit_base", "vit_base": "vit_base", "vit_large": "vit_large",
    "efficientnet": "efficientnet_v2_l", "labse": "labse", "bge_m3": "bge-m3",
    "e5_large": "multilingual-e5-large",
}


def plugin_id_dicts():
    import mmcore_text_bge_m3
    import mmcore_text_sentence_transformers
    import mmcore_vision_efficientnet
    import mmcore_vision_resnet
    import mmcore_vision_siglip2
    import mmcore_vision_vgg
    import mmcore_vision_vit

    ids = {}
    for module in (mmcore_vision_resnet, mmcore_vision_vgg, mmcore_vision_vit, mmcore_vision_efficientnet):
        ids.update(module.WEIGHTS)
    for module in (mmcore_vision_siglip2, mmcore_text_sentence_transformers, mmcore_text_bge_m3):
        ids.update(module.HUB_IDS)
    return ids


def normalized(text):
    return re.sub(r"[^a-z0-9]", "", text.lower())


@pytest.fixture(scope="module")
def real_registry():
    from mmcore.plugins.manager import get_registry

    return get_registry()


def test_each_name_requests_the_mission_hub_id(real_registry, monkeypatch):
    if not MISSION.is_file():
        pytest.skip(f"{MISSION} not present (the product docs live outside the repository)")
    import mmcore_vision_siglip2.encoders

    import mmcore.kit.text
    import mmcore.kit.vision

    def intercept(loader, model_id, **kwargs):
        raise Requested(model_id)

    for module in (mmcore.kit.vision, mmcore.kit.text, mmcore_vision_siglip2.encoders):
        monkeypatch.setattr(module, "load_pretrained", intercept)

    from mmcore.testing import build

    rows = mission_rows()
    names = [n for n in rows if n != "none"]
    assert set(VISION_NAMES + TEXT_NAMES) <= set(rows)
    ids = plugin_id_dicts()
    for name in names:
        kind = "vision" if name in VISION_NAMES else "text"
        with pytest.raises(Requested) as requested:
            build(kind, name, {}, registry=real_registry)  # default params: pretrained weights
        asked = str(requested.value)
        assert asked == ids[name], f"{name}: requests {asked!r}, its plugin's id dict says {ids[name]!r}"
        hub_ids = re.findall(r"`([\w.-]+/[\w.-]+)`", rows[name])
        if hub_ids:
            assert asked == hub_ids[0], f"{name}: requests {asked!r}, MISSION.md says {hub_ids[0]!r}"
        else:
            marker = ARCHITECTURE[name]
            assert marker in asked.lower(), f"{name}: requests {asked!r}, not a {marker} checkpoint"
            assert normalized(marker) in normalized(rows[name]), f"{name}: {rows[name]!r}"


# ---------------------------------------------------------------- (e) mmcore plugins


def test_plugins_lists_every_component_of_the_table():
    result = invoke("plugins")
    listed = {"vision encoders": set(), "text encoders": set()}
    for line in result.output.splitlines():
        for kind in listed:
            if line.strip().startswith(kind):
                listed[kind].update(n.strip() for n in line.strip()[len(kind):].split(","))
    assert set(VISION_NAMES) <= listed["vision encoders"], set(VISION_NAMES) - listed["vision encoders"]
    assert set(TEXT_NAMES) <= listed["text encoders"], set(TEXT_NAMES) - listed["text encoders"]
