"""The training step and loop by value: partial accumulation groups, the lr each step used, the
NaN policy read from the device once per log interval, resume at the sampler, collective devices."""

import math
import re
from pathlib import Path

import pytest
import torch

from mmcore.engine.loop import Trainer
from mmcore.engine.policies import NonFiniteLoss
from mmcore.interfaces import ModelOutput


class Linear(torch.nn.Module):
    """A model over batches {"x": [B, 3]}: one logit per row (as the classifier, a ModelOutput); NaN
    from forward ``nan_at`` (1-based) on."""

    def __init__(self, nan_at=0):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 1)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, batch):
        self.calls += 1
        out = self.fc(batch["x"]).squeeze(1)
        return ModelOutput(out * float("nan") if self.nan_at and self.calls >= self.nan_at else out)


def batches(count, size=4):
    generator = torch.Generator().manual_seed(1)
    return [
        {"errors": [], "size": size, "x": torch.randn(size, 3, generator=generator),
         "label": torch.randint(0, 2, (size,), generator=generator).float()}
        for _ in range(count)
    ]


def trainer(model, *, scheduler=None, accum=1, lr=0.1, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = scheduler(optimizer) if scheduler else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return Trainer(
        model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=torch.nn.BCEWithLogitsLoss(),
        device=torch.device("cpu"), dtype=None, grad_accum_steps=accum, progress=False, **kwargs,
    )


def record_steps(run):
    """(params before, gradients, lr) at every optimizer step of ``run``."""
    seen = []

    def before_step(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen.append(([p.detach().clone() for p in params], [None if p.grad is None else p.grad.clone() for p in params],
                     optimizer.param_groups[0]["lr"]))

    run.optimizer.register_step_pre_hook(before_step)
    return seen


def test_the_last_partial_accumulation_group_is_divided_by_its_size():
    data = batches(8)
    model = Linear()
    run = trainer(model, accum=3)
    steps = record_steps(run)
    run.train_epoch(data, 1, 1)
    assert len(steps) == 3  # groups of 3, 3 and 2 batches

    def hand_gradient(params, group):
        """Mean over the group's batches of each batch's gradient (what one big batch would give)."""
        probe = torch.nn.Linear(3, 1)
        with torch.no_grad():
            probe.weight.copy_(params[0])
            probe.bias.copy_(params[1])
        for batch in group:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(batch["x"]).squeeze(1), batch["label"])
            (loss / len(group)).backward()
        return [probe.weight.grad, probe.bias.grad]

    for (params, grads, _), group in zip(steps, (data[0:3], data[3:6], data[6:8])):
        for got, expected in zip(grads, hand_gradient(params, group)):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # the old divisor (3) would have scaled the last update by 2/3
    params, grads, _ = steps[-1]
    assert not torch.allclose(grads[0], hand_gradient(params, data[6:8])[0] * 2 / 3)


def test_cosine_warmup_lr_used_by_each_optimizer_step(registry):
    """10 steps, 4 of warmup: the rates the optimizer steps ran at, by hand; the first is not 0."""
    reg = registry.get("scheduler", "cosine_warmup")
    params = reg.params_cls(warmup_steps=4)
    model = Linear()
    run = trainer(model, scheduler=lambda opt: reg.factory(params, opt, 10), accum=2, lr=0.5)
    steps = record_steps(run)
    run.train_epoch(batches(20), 1, 1)
    used = [lr for _, _, lr in steps]
    warm = [0.5 * k / 4 for k in (1, 2, 3, 4)]
    cosine = [0.5 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 6)) for k in range(4, 10)]
    assert used == pytest.approx(warm + cosine, rel=1e-12)
    assert used[0] == 0.125


class CountHostReads:
    """Counts reads of a tensor's value on the host (each one waits for the device)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
            original = getattr(torch.Tensor, name)

            def wrapped(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_host_reads_per_epoch_do_not_grow_with_the_steps_under_stop(monkeypatch, on_nan):
    counts = {}
    for count in (4, 16):
        model, data = Linear(), batches(count)
        run = trainer(model, on_nan=on_nan, log_every=1000)
        reads = CountHostReads(monkeypatch)
        run.train_epoch(data, 1, 1)
        counts[count] = reads.count
        monkeypatch.undo()
    if on_nan == "stop":
        assert counts[4] == counts[16] <= 3  # the loss sum and the NaN record, once per epoch
    else:
        assert counts[16] - counts[4] == 12  # "skip" must decide before each backward: one flag per batch


def test_nan_stop_names_the_first_bad_step_though_read_only_at_the_epoch_end():
    model = Linear(nan_at=6)  # the 6th forward: batch 6, in the 3rd accumulation group of 2
    run = trainer(model, accum=2, log_every=1000)
    run.global_step = 10  # as after a resume: steps count on
    with pytest.raises(NonFiniteLoss) as info:
        run.train_epoch(batches(10), 3, 5)
    assert str(info.value) == (
        "non-finite loss (nan) at step 13 (epoch 3, batch 6); stopped, the last good checkpoint is kept "
        '(set train.on_nan = "skip" to skip such batches)'
    )
    assert model.calls == 10  # the loop ran on: the device was read once, at the end


def test_nan_skip_leaves_the_batch_out_and_counts_it():
    model = Linear(nan_at=3)
    run = trainer(model, on_nan="skip")
    before = [p.detach().clone() for p in model.parameters()]
    steps = record_steps(run)
    loss, completed = run.train_epoch(batches(4), 1, 1)
    assert completed and run.skipped_nan_steps == 2 and math.isfinite(loss)
    assert all(grad is None or torch.isfinite(grad).all() for _, grads, _ in steps for grad in grads)
    assert not torch.equal(before[0], model.fc.weight)  # the two good batches did train


def test_a_resumed_epoch_starts_at_the_sampler_with_the_same_items():
    from mmcore.engine.sampling import EpochBatchSampler, SeededItems

    class Draws(torch.utils.data.Dataset):
        """Each item: its index and a random draw (as augmentation makes one)."""

        needs_image, preprocessing = True, None
        fetched = []

        def __len__(self):
            return 20

        def __getitem__(self, index):
            Draws.fetched.append(index)
            return index, torch.rand(1).item()

    dataset = SeededItems(Draws())
    full = EpochBatchSampler(20, 4, seed=5, seeded=True)
    full.set_epoch(2)
    everything = [[dataset[key] for key in batch] for batch in full]
    resumed = EpochBatchSampler(20, 4, seed=5, seeded=True)
    resumed.set_epoch(2, start=3)
    Draws.fetched.clear()
    torch.manual_seed(11)
    expected_next = torch.rand(1)
    torch.manual_seed(11)
    tail = [[dataset[key] for key in batch] for batch in resumed]
    assert len(resumed) == 2 and tail == everything[3:]  # same samples, same random draws
    assert sorted(Draws.fetched) == sorted(i for batch in everything[3:] for i, _ in batch)  # nothing else decoded
    assert torch.equal(torch.rand(1), expected_next)  # the main process's stream is left as it was
    assert len({draw for batch in everything for _, draw in batch}) == 20  # one draw per place in the epoch


@pytest.mark.parametrize(
    "backend, prefer, expected",
    [
        ("nccl", None, "cuda:3"),
        ("nccl", "cpu", "cuda:3"),  # NCCL has no CPU: a host flag goes to the current GPU
        ("cpu:gloo,cuda:nccl", None, "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda:3", "cuda:3"),
        ("gloo", None, "cpu"),
    ],
)
def test_collectives_run_on_a_device_the_backend_supports(monkeypatch, backend, prefer, expected):
    from mmcore import dist

    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dist.collective_device(prefer) == torch.device(expected)


def test_no_collective_outside_dist():
    """Every collective goes through mmcore/dist.py, which puts its tensor on collective_device()."""
    root = Path(__file__).resolve().parents[1] / "mmcore"
    pattern = re.compile(r"torch\.distributed\.(all_reduce|broadcast|all_gather|reduce|scatter|gather|send|recv)\w*\(")
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py") if path.relative_to(root) != Path("dist.py")
        for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)
    ]
    assert offenders == []
