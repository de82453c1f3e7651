"""Host syncs per training step and per cache-fill batch, with the source line of each.

    python bench/sync_probe.py                          # full size on a GPU: lora6, top6, head, frozen
    python bench/sync_probe.py --tiny                   # tiny encoders (CPU or GPU)
    torchrun --nproc_per_node=2 bench/sync_probe.py --tiny --modes head    # + collectives per step (gloo on CPU)

A host sync is a point where the Python process waits for the device: a value read back
(``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.numpy()``), or a constant
built from host data onto the device (``torch.tensor(list, device=cuda)`` copies from pageable
memory and waits). On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports every real one;
on the CPU nothing waits, so the probe counts the calls that would (a ``TorchFunctionMode``
watching reads of values the step computed and constants made from Python data, outside the
data loader). Under torchrun it also counts the collectives the engine starts (DDP's own
gradient all-reduce is not one of them). Figures are per optimizer step (training modes) or per
batch (``frozen``: the vision feature-cache fill), over ``--steps`` steps after a warm-up.

Modes (the default recipe, ``recipes/siglip_labse_gmu.toml``, random weights): ``head`` trains
the fusion head from cached features (the default recipe's epochs: tiny steps, where syncs
show most); ``lora6``, ``top6`` train on pixels (LoRA on / the top 6 blocks of the vision
encoder); ``frozen`` fills the vision feature cache. Exit status 0; it measures, it does not judge.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import sys
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
MODES = ("head", "lora6", "top6", "frozen")
#: frames of the data loader: what it builds is host data, never a device value
LOADER_FRAMES = ("torch/utils/data", "torch/multiprocessing", "multiprocessing/")
#: frames whose calls are reported by their line
OWN_FRAMES = ("/mmcore/", "/plugins/", "/bench/")
READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")
CONSTANTS = (torch.tensor, torch.as_tensor)
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier")


def _where():
    """``file:line code`` of the innermost mmcore/plugin/bench frame calling (or '?')."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if any(own in frame.filename for own in OWN_FRAMES) and "sync_probe" not in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.line}"
    return "?"


def _in_loader(depth=24):
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if any(part in frame.f_code.co_filename for part in LOADER_FRAMES):
            return True
        frame = frame.f_back
    return False


class HostSyncs(TorchFunctionMode):
    """Counts host syncs (as above) made by the main thread inside the block, by source line."""

    def __init__(self):
        super().__init__()
        self.found = collections.Counter()
        self._computed = {}  # id -> weakref of the tensors the step computed (tensors do not hash by value)
        self._main = threading.main_thread()
        self._cuda = torch.cuda.is_available()
        self._patched = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        main = threading.current_thread() is self._main
        name = getattr(func, "__name__", "")
        if main and name in READS and args and isinstance(args[0], torch.Tensor) and self._was_computed(args[0]):
            self.found[f"read     {_where()}"] += 1
        if main and func in CONSTANTS and args and not isinstance(args[0], torch.Tensor) and not _in_loader():
            self.found[f"constant {_where()}"] += 1
        out = func(*args, **kwargs)
        if main and not _in_loader():
            inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs:
                    self._remember(tensor)
        return out

    def _remember(self, tensor):
        key = id(tensor)

        def forget(ref, key=key):
            if self._computed.get(key) is ref:
                del self._computed[key]

        self._computed[key] = weakref.ref(tensor, forget)

    def _was_computed(self, tensor):
        ref = self._computed.get(id(tensor))
        return ref is not None and ref() is tensor

    def __enter__(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for name in COLLECTIVES:
                original = getattr(torch.distributed, name)

                def counted(*args, _original=original, _name=name, **kwargs):
                    self.found[f"collect  {_name} from {_where()}"] += 1
                    return _original(*args, **kwargs)

                self._patched.append((name, original))
                setattr(torch.distributed, name, counted)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        self._show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                self.found[f"cuda     {_where()}"] += 1

        warnings.showwarning = show
        if self._cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc):
        if self._cuda:
            torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self._show
        self._warnings.__exit__(*exc)
        for name, original in self._patched:
            setattr(torch.distributed, name, original)
        return super().__exit__(*exc)

    def report(self, title, per):
        kinds = collections.Counter()
        for where, count in self.found.items():
            kinds[where.split()[0]] += count
        summary = ", ".join(f"{kinds[k] / per:.2f} {k}" for k in ("cuda", "read", "constant", "collect") if kinds[k])
        print(f"  {title}: {sum(self.found.values()) / per:.2f} host syncs per {'batch' if 'fill' in title else 'step'}"
              f" ({summary or 'none'})", flush=True)
        for where, count in self.found.most_common(12):
            print(f"    {count / per:6.2f}  {where}", flush=True)


def recipe_for(args, root, mode):
    from mmcore.plugins.manager import get_registry
    from mmcore.recipe import load_recipe

    cuda = torch.cuda.is_available() and not args.cpu
    overrides = [
        f"data.base_dir={str(root / 'data')!r}", "vision.params.pretrained=false", "text.params.pretrained=false",
        f"train.batch_size={args.batch}", f"cache.dir={str(root / ('cache-' + mode))!r}", "logging.tensorboard=false",
        f"train.device={'cuda' if cuda else 'cpu'!r}", f"data.num_workers={args.workers}",
    ]
    if args.tiny:
        overrides += ["vision.params.tiny=true", "text.params.tiny=true"]
    layers = 1 if args.tiny else 6
    if mode == "lora6":
        overrides += ["train.lora.enabled=true", f"train.lora.target_layers={layers}"]
    elif mode == "top6":
        overrides += ["train.freeze_backbone=false", f"train.finetune_layers={layers}"]
    registry = get_registry()
    return load_recipe(REPO / "recipes" / "siglip_labse_gmu.toml", overrides, registry=registry), registry


def probe_fill(args, root):
    """Syncs per batch of the vision feature-cache fill (after a warm-up fill of one batch)."""
    from mmcore.data.csvs import load_splits
    from mmcore.engine.features import fill_vision_cache, image_keys
    from mmcore.engine.pipeline import Pipeline

    recipe, registry = recipe_for(args, root, "frozen")
    pipeline = Pipeline(recipe, registry, progress=False)
    split = load_splits(recipe.data)["train"]
    store = pipeline._vision_store()
    keys = image_keys(pipeline.cache_root, split)
    fill = dict(batch_size=args.batch, device=pipeline.device, dtype=pipeline.dtype, num_workers=max(1, args.workers),
                max_image_pixels=recipe.data.max_image_pixels, progress=False)
    fill_vision_cache(pipeline.model, split.subset(range(args.batch)), store, keys[: args.batch], **fill)
    n = min(len(split) - args.batch, args.steps * args.batch)
    rest = list(range(args.batch, args.batch + n))
    started = time.perf_counter()
    with HostSyncs() as syncs:
        fill_vision_cache(pipeline.model, split.subset(rest), store, [keys[i] for i in rest], **fill)
    seconds = time.perf_counter() - started
    syncs.report(f"[frozen] vision cache fill, {n} images in batches of {args.batch} ({n / seconds:.0f} img/s)",
                 -(-n // args.batch))


def probe_training(args, root, mode):
    """Syncs per optimizer step of the engine's Trainer (batches loaded before the probe)."""
    from mmcore.data.csvs import load_splits
    from mmcore.engine.loop import Trainer
    from mmcore.engine.pipeline import Pipeline
    from mmcore.model.components import build_component
    from mmcore.model.trainability import parameter_groups

    recipe, registry = recipe_for(args, root, mode)
    pipeline = Pipeline(recipe, registry, progress=False)
    model, device = pipeline.model, pipeline.device
    split = load_splits(recipe.data)["train"]
    dataset, split, _ = pipeline.dataset(split, train=True)  # head: fills the feature cache
    batches = []
    for batch in pipeline.loader(dataset, train=True):
        batches.append(batch)
        if len(batches) == args.steps + 2:
            break
    train = recipe.train
    optimizer = torch.optim.AdamW(parameter_groups(model, head_lr=train.learning_rate, backbone_lr=train.backbone_lr,
                                                   lora_lr=train.lora_lr, weight_decay=train.weight_decay))
    scheduler = build_component(registry, "scheduler", recipe.scheduler, optimizer, 1000)
    labels = split.label_array()
    loss_fn = build_component(registry, "loss", recipe.loss, (int((labels == 0).sum()), int((labels == 1).sum())))
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, device=device,
                      dtype=pipeline.dtype, grad_clip=train.grad_clip, progress=False,
                      channels_last=pipeline.channels_last)
    trainer.train_epoch(batches[:2], 1, 1)  # warm-up: AdamW state, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    measured = batches[2:]
    started = time.perf_counter()
    with HostSyncs() as syncs:
        trainer.train_epoch(measured, 1, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    images = sum(b["size"] for b in measured)
    peak = f", peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if device.type == "cuda" else ""
    syncs.report(f"[{mode}] {len(measured)} engine steps, batch {args.batch} ({images / seconds:.0f} img/s with the "
                 f"probe on{peak})", len(measured))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--tiny", action="store_true", help="tiny encoders and 64 px images")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where CUDA is present")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="measured steps (batches for frozen)")
    parser.add_argument("--images", type=int, default=0, help="generated train images (default: enough for the steps)")
    parser.add_argument("--workers", type=int, default=-1)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")

    from mmcore.commands.demo import make_demo_dataset
    from mmcore.dist import init_distributed, is_main, shutdown_distributed

    distributed = init_distributed()
    root = Path(tempfile.mkdtemp(prefix="mmcore-sync-probe-"))
    size = 64 if args.tiny else 384
    images = args.images or (args.steps + 3) * args.batch
    make_demo_dataset(root / "data", n_train=images, n_val=4, n_test=4, size=(size, size))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu"
    quiet = contextlib.redirect_stdout(None) if not is_main() else contextlib.nullcontext()
    with quiet:
        print(f"host-sync probe: {'tiny encoders' if args.tiny else 'SigLIP2 SO400M + LaBSE-size, random weights'}, "
              f"batch {args.batch}, device {device}, torch {torch.__version__}"
              f"{', torchrun ' + str(torch.distributed.get_world_size()) + ' processes' if distributed else ''}",
              flush=True)
        for mode in modes:
            if mode == "frozen":
                probe_fill(args, root)
            else:
                probe_training(args, root, mode)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print("sync probe done", flush=True)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
