"""Multi-process checks run under ``torchrun --nproc_per_node=2`` with gloo (see test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_checks.py OUT_DIR RECIPE
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_checks.py cli ARGS...
    python -m torch.distributed.run --standalone --nproc_per_node=3 tests/ddp_checks.py reshard OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json`` with what it saw; the test compares the ranks. In
both modes every torch.distributed collective is watched: a tensor on a device the backend
cannot run collectives on fails the run.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from mmcore.interfaces import ModelOutput


def watch_collectives(log):
    """Wrap the tensor collectives: check each tensor's device against the backend's."""
    from torch.distributed import distributed_c10d

    from mmcore import dist as mmdist

    for name in ("all_reduce", "broadcast", "all_gather", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def checked(tensor, *args, _name=name, _original=original, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            for t in tensors:
                if t.device.type not in mmdist.backend_devices():
                    raise AssertionError(f"{_name} on {t.device} with backend {mmdist.backend_name()}")
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
        return ModelOutput(out * float("nan") if (dist.get_rank(), self.calls) in self.nan else out)


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


def train(nan=(), empty=(), on_nan="skip", accum=2, count=6, bad_image_policy="skip", model=None, data=None):
    """A DDP-wrapped model (default: :class:`Linear`) trained one epoch by the engine's Trainer
    on ``data`` (default: :func:`batches`); what the rank ends with."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from mmcore.engine.loop import Trainer
    from mmcore.engine.policies import BadImages

    model = Linear(nan) if model is None else model
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
        data = batches(count, dist.get_rank(), empty) if data is None else data
        loss, completed = trainer.train_epoch(data, 1, 1)
        result.update(completed=completed, loss=loss)
    except Exception as exc:  # noqa: BLE001 - the message is what the test compares
        result["error"] = str(exc)
    result.update(reductions=len(reductions), params=params_of(model), skipped=trainer.skipped_nan_steps,
                  steps=trainer.global_step)
    return result


class Tower(torch.nn.Module):
    """A vision encoder, mean of its tokens, one logit: ``model.vision`` as the engine expects."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision
        self.fc = torch.nn.Linear(vision.out_dim, 1)

    def forward(self, batch):
        return ModelOutput(self.fc(self.vision(batch["x"]).tokens.mean(1)).squeeze(1))


def image_batches(count, rank, size=32):
    """``count`` batches of 4 noise images, different on each rank."""
    generator = torch.Generator().manual_seed(20 + rank)
    return [{"errors": [], "size": 4, "x": torch.randn(4, 3, size, size, generator=generator) * 2 + rank,
             "label": torch.randint(0, 2, (4,), generator=generator).float()} for _ in range(count)]


def timm_tower(model_name):
    """The shared timm glue's tiny ``model_name`` (random weights), every layer trainable, in a :class:`Tower`."""
    from types import SimpleNamespace

    from mmcore.kit.vision import build_timm_encoder
    from mmcore.model.trainability import LoraConfig, apply_trainability

    torch.manual_seed(0)  # the same model on every rank
    encoder = build_timm_encoder(model_name, model_name, SimpleNamespace(tiny=True, pretrained=False, weights=None))
    apply_trainability(encoder, freeze_backbone=False, finetune_layers=-1, lora=LoraConfig())
    return Tower(encoder)


def timm_all_layers():
    """A tiny timm ConvNeXt (its head.norm unused by the features) trained with every layer under DDP."""
    model = timm_tower("convnext_atto")
    result = train(model=model, data=image_batches(4, dist.get_rank()), accum=1, on_nan="stop")
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def batchnorm():
    """A tiny timm ResNet (trainable BatchNorm) under gloo DDP: its statistics after training."""
    from mmcore.model.trainability import distributed_batchnorm

    model = timm_tower("resnet18")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.tolist() for m in norms]
    mode = distributed_batchnorm(model.vision, device=torch.device("cpu"), world_size=dist.get_world_size())
    weights = [m.weight.detach().clone() for m in norms]
    result = train(model=model, data=image_batches(4, dist.get_rank()), accum=1, on_nan="stop")
    result.update(
        mode=mode, norms=len(norms),
        stats=[m.running_mean.tolist() + m.running_var.tolist() for m in norms],
        stats_unchanged=before == [m.running_mean.tolist() for m in norms],
        weights_trained=any(not torch.equal(w, m.weight) for w, m in zip(weights, norms)),
    )
    return result


def workers():
    """What ``num_workers = -1`` gives this rank, and what it is derived from."""
    from mmcore.data.dataset import MAX_AUTO_WORKERS, default_num_workers

    return {"workers": default_num_workers(), "cores": len(os.sched_getaffinity(0)),
            "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]), "cap": MAX_AUTO_WORKERS}


def reshard(out):
    """3 ranks, two node-local text caches (ranks 0 and 1 share one, rank 2 has its own): the
    text entries each rank computes in the sharded pass and in the re-sharded rest."""
    from mmcore_fake_encoders import FakeText, FakeTextParams

    from mmcore.engine.features import fill_text_cache, text_store
    from mmcore.engine.pipeline import fill_in_parallel
    from mmcore.store.keys import text_key

    rank = dist.get_rank()
    encoder = FakeText(FakeTextParams())
    texts = [f"ad text number {i}" for i in range(60)]
    store = text_store(os.path.join(out, "node-a" if rank < 2 else "node-b"), encoder)
    computed = []

    def fill(**shard):
        computed.append(fill_text_cache(encoder, texts, store, progress=False, **shard))

    fill_in_parallel(fill, store, [text_key(t) for t in texts])
    return {"computed": computed, "missing": len(store.missing([text_key(t) for t in texts], refresh=True))}


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
    from mmcore.dist import init_distributed

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
        try:
            cli()
        except SystemExit as done:
            # the DDP wrapper must not outlive the command, not even as uncollected garbage: it
            # would keep the process group alive until interpreter teardown (see
            # Trainer.release_data_parallel); counted before any collection
            import gc

            alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
            print(f"rank {dist.get_rank() if dist.is_initialized() else os.environ['RANK']}: "
                  f"DistributedDataParallel objects alive after the command: {alive}", flush=True)
            raise SystemExit(done.code) from None
        return
    if sys.argv[1] == "reshard":
        out = sys.argv[2]
        init_distributed(timeout_s=120)
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(reshard(out), f)
        dist.destroy_process_group()
        return
    out, recipe = sys.argv[1], sys.argv[2]
    init_distributed()
    watch_collectives(log)
    result = {
        "timm": timm_all_layers(),
        "batchnorm": batchnorm(),
        "workers": workers(),
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
