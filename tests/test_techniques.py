"""Training techniques by value: EMA of the weights, checkpoint soups, layer-wise lr decay, torch.compile."""

import json
import signal
import tomllib

import pytest
import tomli_w
import torch
from test_resume import _scores, _start, _wait_for_checkpoint

from mmcore.engine.averaging import WeightEMA, average_states, greedy_soup
from mmcore.engine.step import TrainStep
from mmcore.interfaces import ModelOutput


class Head(torch.nn.Module):
    """Two layers over batches {"x": [B, 3]}; one logit per row."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
        self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)

    def forward(self, batch):
        return ModelOutput(self.fc2(torch.relu(self.fc1(batch["x"] + self.frozen(batch["x"])))).squeeze(1))


def test_ema_equals_a_hand_computed_ema_after_k_steps():
    model, decay = Head(), 0.9
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ema = WeightEMA(model, decay)
    step = TrainStep(model, optimizer, scheduler, torch.nn.BCEWithLogitsLoss(), device=torch.device("cpu"), dtype=None, ema=ema)
    hand = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):
        batch = {"x": torch.randn(8, 3, generator=generator), "label": torch.randint(0, 2, (8,), generator=generator).float()}
        step.micro_step(batch, weight=1.0, sync=True)
        step.optimizer_step()
        for name, p in model.named_parameters():
            if p.requires_grad:
                hand[name] = decay * hand[name] + (1 - decay) * p.detach()
    state = ema.state_dict()
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # trainable weights only
    for name, value in hand.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6)
        assert not torch.allclose(state[name], dict(model.named_parameters())[name], atol=1e-4)  # not the raw weights
    raw = {name: p.detach().clone() for name, p in model.named_parameters()}
    with ema.applied():
        assert torch.equal(model.fc1.weight, state["fc1.weight"])
    assert all(torch.equal(p, raw[name]) for name, p in model.named_parameters())  # restored exactly


def test_the_ema_follows_batch_norm_statistics_like_the_weights_and_resumes_older_checkpoints():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decay = 0.8
    ema = WeightEMA(model, decay)
    hand = {name: t.detach().clone() for name, t in model.state_dict().items() if t.is_floating_point()}
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):  # a forward in train mode moves the running statistics; then a weight step
        model(torch.randn(16, 3, generator=generator) * 3 + 1)
        with torch.no_grad():
            model[0].weight.add_(0.1)
        ema.update()
        current = model.state_dict()
        hand = {name: decay * value + (1 - decay) * current[name] for name, value in hand.items()}
    state = ema.state_dict()
    assert set(state) == set(hand) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    for name, value in hand.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6)
    raw = {name: t.clone() for name, t in model.state_dict().items()}
    assert not torch.allclose(raw["1.running_mean"], state["1.running_mean"], atol=1e-3)
    model.eval()
    x = torch.randn(8, 3, generator=generator)
    with ema.applied():  # validated under the EMA statistics: the same as a model built from the EMA state
        assert torch.equal(model[1].running_var, state["1.running_var"])
        inside = model(x)
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    twin.load_state_dict({**raw, **state})
    torch.testing.assert_close(inside, twin(x), rtol=0, atol=0)
    assert all(torch.equal(t, raw[name]) for name, t in model.state_dict().items())  # restored exactly

    # a last.ckpt written before the EMA followed the statistics: they start from the model's
    older = {name: value for name, value in state.items() if "running" not in name}
    resumed = WeightEMA(model, decay)
    resumed.load_state_dict(older)
    after = resumed.state_dict()
    assert torch.equal(after["1.running_mean"], raw["1.running_mean"]) and torch.equal(after["0.weight"], state["0.weight"])
    with pytest.raises(KeyError, match="lacks 1 weights"):
        resumed.load_state_dict({name: value for name, value in state.items() if name != "0.bias"})


def test_soups_by_value():
    members = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([100.0, 100.0])}]
    assert torch.equal(average_states(members[:2])["w"], torch.tensor([2.0, 1.0]))
    # validation prefers weights near (2, 1): the second member helps, the third would hurt
    score = lambda state: -float((state["w"] - torch.tensor([2.0, 1.0])).abs().sum())  # noqa: E731
    soup, chosen, value = greedy_soup(members, score, lambda new, old: new > old)
    assert chosen == [0, 1] and torch.equal(soup["w"], torch.tensor([2.0, 1.0])) and value == 0.0
    soup, chosen, value = greedy_soup([members[2], members[0]], score, lambda new, old: new > old)
    assert chosen == [0, 1] and value == score(average_states([members[2], members[0]]))


def test_layer_decay_lr_of_each_block_is_lr_times_decay_to_its_depth(registry):
    from mmcore.engine.pipeline import Pipeline
    from mmcore.model.trainability import parameter_groups
    from mmcore.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {"vision": {"name": "fake_vit"}, "text": {"name": "fake_text"}, "train": {"finetune_layers": -1},
         "cache": {"enabled": False}},
        registry=registry,
    )
    model = Pipeline(recipe, registry, progress=False).model
    groups = parameter_groups(model, head_lr=1e-3, backbone_lr=1e-4, lora_lr=1e-4, weight_decay=0.01, layer_decay=0.75)
    lr_of = {id(p): (group["lr"], group["name"]) for group in groups for p in group["params"]}
    blocks = model.vision.blocks()
    n = len(blocks)
    assert n >= 2
    for i, block in enumerate(blocks):
        depth = n - 1 - i  # the top (last) block is depth 0
        for p in block.parameters():
            assert lr_of[id(p)] == (pytest.approx(1e-4 * 0.75**depth, rel=1e-12), f"backbone.depth{depth}")
    for p in model.vision.final_norm().parameters():
        assert lr_of[id(p)][0] == pytest.approx(1e-4)
    in_blocks = {id(p) for b in blocks for p in b.parameters()} | {id(p) for p in model.vision.final_norm().parameters()}
    embeddings = [p for p in model.vision.parameters() if id(p) not in in_blocks]
    assert embeddings and all(lr_of[id(p)][0] == pytest.approx(1e-4 * 0.75**n) for p in embeddings)
    assert all(lr_of[id(p)] == (1e-3, "head") for p in model.head.parameters())
    # decay 1 is the plain grouping
    plain = parameter_groups(model, head_lr=1e-3, backbone_lr=1e-4, lora_lr=1e-4, weight_decay=0.01)
    assert [g["name"] for g in plain] == ["head", "head", "backbone", "backbone"]


def _tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_greedy_soup_is_never_worse_than_its_best_member_and_is_what_best_holds(cli, tiny_recipe, tmp_path):
    path = tiny_recipe(train={"epochs": 4, "soup": "greedy", "soup_k": 3, "early_stopping": {"patience": 0}})
    out = tmp_path / "run"
    cli("run", path, "--out", out, "--quiet")
    results = json.loads((out / "results.json").read_text())
    soup, metric = results["soup"], results["selection_metric"]
    pool = soup["candidates"]
    assert len(pool) == 3 and [c[metric] for c in pool] == sorted((c[metric] for c in pool), reverse=True)
    assert pool[0][metric] == max(h[metric] for h in results["history"])  # the best epoch leads
    assert soup["members"][0] == pool[0] and all(m in pool for m in soup["members"])
    assert soup["val"][metric] >= pool[0][metric]
    assert results["val"] == soup["val"]
    # checkpoint_best.ckpt holds the average of the members' trainable weights (kept in last.ckpt's pool)
    best = torch.load(out / "checkpoint_best.ckpt", weights_only=True)
    assert best["soup"]["members"] == soup["members"]
    kept = {(e["epoch"], e["weights"]): e["state"] for e in torch.load(out / "last.ckpt", weights_only=True)["soup_pool"]}
    expected = average_states([kept[m["epoch"], m["weights"]] for m in soup["members"]])
    for name, value in expected.items():
        assert torch.equal(best["model"][name], value), name


@pytest.mark.slow
def test_ema_is_selectable_and_survives_sigkill_resume_exactly(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"epochs": 2, "batch_size": 8, "ema": {"decay": 0.6}, "checkpoint_every_steps": 2,
                                "early_stopping": {"patience": 0}})
    straight = tmp_path / "straight"
    cli("run", recipe, "--out", straight, "--quiet")
    results = json.loads((straight / "results.json").read_text())
    metric, chosen = results["selection_metric"], results["selected_weights"]
    assert chosen in ("raw", "ema")
    row = next(h for h in results["history"] if h["epoch"] == results["selected_epoch"])
    value = row[metric] if chosen == "raw" else row[f"ema_{metric}"]
    assert results["val"][metric] == value == max(max(h[metric], h[f"ema_{metric}"]) for h in results["history"])
    scalars = _tensorboard_scalars(straight)
    assert scalars[f"val_ema/{metric.removeprefix('val_')}"] == pytest.approx([h[f"ema_{metric}"] for h in results["history"]])

    killed = tmp_path / "killed"
    proc = _start(recipe, killed)
    _wait_for_checkpoint(proc, killed / "last.ckpt", lambda s: s["epoch"] == 2 and not s["epoch_complete"] and s["batches_done"] > 0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cli("run", "--resume", killed, "--quiet")
    ema_straight = torch.load(straight / "last.ckpt", weights_only=True)["ema"]
    ema_resumed = torch.load(killed / "last.ckpt", weights_only=True)["ema"]
    assert ema_straight.keys() == ema_resumed.keys() and all(torch.equal(ema_straight[k], ema_resumed[k]) for k in ema_straight)
    assert _scores(killed) == _scores(straight)
    resumed = json.loads((killed / "results.json").read_text())
    assert [h[f"ema_{metric}"] for h in resumed["history"]] == [h[f"ema_{metric}"] for h in results["history"]]


def test_compile_trains_to_the_same_scores_and_a_failing_compile_warns_once_and_runs_eager(cli, tiny_recipe, tmp_path):
    """``aot_eager`` is torch.compile's graph capture and AOT autograd without C++ code generation
    (inductor on this 2-core machine takes minutes to compile; see docs/recipes.md)."""
    train = {"epochs": 1, "finetune_layers": -1, "layer_decay": 0.5, "early_stopping": {"patience": 0}}
    compiled = cli("run", tiny_recipe("c.toml", train={**train, "compile": "aot_eager"}), "--out", tmp_path / "c", "--quiet")
    assert "warning" not in compiled.stderr  # it compiled: no fallback
    eager = cli("run", tiny_recipe("e.toml", train={**train, "compile": "no_such_backend"}), "--out", tmp_path / "e", "--quiet")
    warnings = [line for line in eager.stderr.splitlines() if "train.compile" in line]
    assert warnings == [
        "warning: train.compile: torch.compile failed here (InvalidBackend: Invalid backend: 'no_such_backend'. "
        "See `torch._dynamo.list_backends()` for available backends.); training uncompiled"
    ]
    for (path_c, score_c), (path_e, score_e) in zip(_scores(tmp_path / "c"), _scores(tmp_path / "e"), strict=True):
        assert path_c == path_e and score_c == pytest.approx(score_e, abs=1e-5)
    # layer decay shows in TensorBoard: per group, at every step, lr(depth d) = lr(depth 0) * 0.5^d
    scalars = _tensorboard_scalars(tmp_path / "e")
    top = scalars["lr/backbone.depth0"]
    depths = sorted(int(tag.rpartition("depth")[2]) for tag in scalars if tag.startswith("lr/backbone.depth"))
    assert len(depths) >= 3
    for depth in depths:
        assert scalars[f"lr/backbone.depth{depth}"] == pytest.approx([lr * 0.5**depth for lr in top], rel=1e-6)


def test_a_one_member_soup_of_a_batch_norm_network_is_exactly_its_best_epoch(cli, tiny_recipe, tmp_path):
    # resnet18 tiny trained from scratch (batch norm in train mode): the soup keeps each epoch's
    # running statistics with its weights, so a greedy soup of one member is the best epoch
    # itself, not its weights under the last epoch's statistics
    train = {"epochs": 4, "freeze_backbone": False, "finetune_layers": -1, "learning_rate": 0.03,
             "early_stopping": {"patience": 0}}

    def recipe(name, **more):
        path = tiny_recipe(name, train={**train, **more})
        data = tomllib.loads(path.read_text())
        data["vision"] = {"name": "resnet18", "params": {"pretrained": False, "tiny": True}}
        path.write_text(tomli_w.dumps(data))
        return path

    plain, souped = tmp_path / "plain", tmp_path / "soup"
    cli("run", recipe("plain.toml"), "--out", plain, "--quiet")
    cli("run", recipe("soup.toml", soup="greedy", soup_k=1), "--out", souped, "--quiet")

    a, b = (json.loads((run / "results.json").read_text()) for run in (plain, souped))
    assert a["selected_epoch"] < 4  # otherwise the last epoch's statistics would be the right ones anyway
    assert b["soup"]["members"][0]["epoch"] == a["selected_epoch"]
    best_a, best_b = (torch.load(run / "checkpoint_best.ckpt", weights_only=True)["model"] for run in (plain, souped))
    stats = [name for name in best_a if name.endswith("running_mean")]
    assert stats and best_a.keys() == best_b.keys()
    for name in best_a:
        assert torch.equal(best_a[name], best_b[name]), name
    assert b["val"][a["selection_metric"]] == a["val"][a["selection_metric"]]
    assert b["test"] == a["test"]
