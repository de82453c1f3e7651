"""Multi-process checks run under ``torchrun --nproc_per_node=2`` with gloo (see test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_checks.py OUT_DIR RECIPE
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_checks.py cli ARGS...

Each rank writes ``OUT_DIR/rank<r>.json`` with what it saw; the test compares the ranks. In
both modes every torch.distributed collective is watched: a tensor on a device the backend
cannot run collectives on fails the run.
"""

import json
import os
import sys

import torch
import torch.distributed as dist


def watch_collectives(log):
    """Wrap the tensor collectives: check each tensor's device against the backend's."""
    from torch.distributed import distributed_c10d

    from mmcore.engine import runtime

    for name in ("all_reduce", "broadcast", "all_gather", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def checked(tensor, *args, _name=name, _original=original, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            for t in tensors:
                if t.device.type not in runtime.backend_devices():
                    raise AssertionError(f"{_name} on {t.device} with backend {runtime.backend_name()}")
            log.append(_name)
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, checked)
        setattr(distributed_c10d, name, checked)  # what the object collectives call inside


def params_of(model):
    return [p.detach().flatten().tolist() for p in model.parameters()]


class Linear(torch.nn.Module):
    """One logit per row of batch["x"]; NaN on the ranks and forwards listed in ``nan``."""

    def __init__(self, nan=()):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 1)
        self.nan, self.calls = set(nan), 0

    def forward(self, batch):
        self.calls += 1
        out = self.fc(batch["x"]).squeeze(1)
        return out * float("nan") if (dist.get_rank(), self.calls) in self.nan else out


def batches(count, rank, empty=()):
    generator = torch.Generator().manual_seed(10 + rank)
    out = []
    for i in range(count):
        batch = {"errors": [], "size": 4, "x": torch.randn(4, 3, generator=generator),
                 "label": torch.randint(0, 2, (4,), generator=generator).float()}
        if (rank, i) in empty:
            batch = {"errors": ["bad.png: cannot be read"], "size": 0}
        out.append(batch)
    return out


def train(nan=(), empty=(), on_nan="skip", accum=2, count=6, bad_image_policy="skip"):
    """A DDP-wrapped model trained one epoch by the engine's Trainer; what the rank ends with."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from mmcore.engine.loop import Trainer
    from mmcore.engine.policies import BadImages

    model = Linear(nan)
    ddp = DistributedDataParallel(model)
    reductions = []

    def counting_hook(state, bucket):
        reductions.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(
        model=ddp, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        loss_fn=torch.nn.BCEWithLogitsLoss(), device=torch.device("cpu"), dtype=None, grad_accum_steps=accum,
        on_nan=on_nan, bad_images=BadImages(bad_image_policy), progress=False,
    )
    result = {"reductions": len(reductions)}
    try:
        loss, completed = trainer.train_epoch(batches(count, dist.get_rank(), empty), 1, 1)
        result.update(completed=completed, loss=loss)
    except Exception as exc:  # noqa: BLE001 - the message is what the test compares
        result["error"] = str(exc)
    result.update(reductions=len(reductions), params=params_of(model), skipped=trainer.skipped_nan_steps,
                  steps=trainer.global_step)
    return result


def seeds(recipe_path):
    """A real Pipeline on each rank: the model as built, then the random stream training draws from."""
    import mmcore_fake_encoders

    from mmcore.engine.pipeline import Pipeline
    from mmcore.plugins.manager import make_registry
    from mmcore.recipe import load_recipe

    registry = make_registry(load_entrypoints=False, extra_plugins=[("fake", mmcore_fake_encoders)])
    recipe = load_recipe(recipe_path, registry=registry)
    pipeline = Pipeline(recipe, registry, progress=False)
    head = pipeline.model.head
    head.train()
    mask = torch.nn.functional.dropout(torch.ones(256), 0.5, training=True)
    return {"init": [v.flatten().tolist()[:50] for v in pipeline.model.state_dict().values()],
            "dropout_mask": (mask > 0).int().tolist()}


def main():
    from mmcore.engine.runtime import init_distributed

    log = []
    if sys.argv[1] == "cli":  # the real CLI; ranks > 0 must not read the best checkpoint
        from mmcore.engine import training

        init_distributed()
        watch_collectives(log)
        if dist.get_rank() > 0:
            def no_file(path, *args, **kwargs):
                raise AssertionError(f"rank {dist.get_rank()} read {path}")

            training.read_checkpoint = no_file
        from mmcore.cli.main import main as cli

        sys.argv = ["mmcore", *sys.argv[2:]]
        cli()
        return
    out, recipe = sys.argv[1], sys.argv[2]
    init_distributed()
    watch_collectives(log)
    result = {
        "no_sync": train(accum=4, count=8, on_nan="stop", bad_image_policy="error"),
        # rank 1's loss is NaN at its 2nd forward (a group's last, synced micro-batch) and 3rd
        "nan_skip": train(nan={(1, 2), (1, 3)}),
        "nan_stop": train(nan={(1, 3)}, on_nan="stop"),
        # rank 0's 4th batch (a group's last) has no readable image
        "empty": train(empty={(0, 3)}),
        "seeds": seeds(recipe),
        "collectives": sorted(set(log)),
    }
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
