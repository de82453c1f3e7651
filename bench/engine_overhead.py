"""Engine step time (``Trainer.train_epoch``) vs a plain hand-written PyTorch loop.

    python bench/engine_overhead.py [--steps 40] [--width 64] [--batch 32]

Same model (fake_cnn-sized CNN from the test plugin, trainable, multimodal with cached text
vectors), same batches already in memory, same optimizer, scheduler, loss, clipping and
precision; the loops alternate so background load hits both alike. Target: <= 1.05x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(width, batch, steps, image_size):
    import mmcore_fake_encoders

    from mmcore.engine.pipeline import Pipeline
    from mmcore.model.components import build_component
    from mmcore.model.trainability import parameter_groups
    from mmcore.plugins.manager import make_registry
    from mmcore.recipe import recipe_from_dict

    registry = make_registry(load_entrypoints=False, extra_plugins=[("fake", mmcore_fake_encoders)])
    recipe = recipe_from_dict(
        {
            "vision": {"name": "fake_cnn", "params": {"width": width, "image_size": image_size}},
            "text": {"name": "fake_text"},
            "pooling": {"name": "attention"},
            "train": {"freeze_backbone": False, "finetune_layers": -1, "batch_size": batch},
            "cache": {"enabled": False},
        },
        registry=registry,
    )
    pipeline = Pipeline(recipe, registry, progress=False)
    model = pipeline.model
    groups = parameter_groups(model, head_lr=1e-4, backbone_lr=1e-5, lora_lr=1e-4, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups)
    scheduler = build_component(registry, "scheduler", recipe.scheduler, optimizer, 10**6)
    loss_fn = build_component(registry, "loss", recipe.loss, (batch, batch))
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
        batches.append({
            "errors": [], "bad_indices": [], "size": batch,
            "label": (torch.rand(batch, generator=generator) > 0.5).float(),
            "vision": {"pixel_values": pixels},
            "text_feature": torch.randn(batch, model.text.out_dim, generator=generator),
        })
    return pipeline, model, optimizer, scheduler, loss_fn, batches


def plain_loop(model, optimizer, scheduler, loss_fn, batches, grad_clip=1.0):
    """What one would write by hand: forward, loss, backward, clip, step."""
    from mmcore.model.trainability import freeze_norm_statistics

    model.train()
    freeze_norm_statistics(model.vision)  # the engine keeps a fine-tuned encoder's BN statistics
    trainable = [p for p in model.parameters() if p.requires_grad]
    for batch in batches:
        pixels = batch["vision"]["pixel_values"].contiguous(memory_format=torch.channels_last)
        logits = model({"vision": {"pixel_values": pixels}, "text_feature": batch["text_feature"]}).logit
        loss = loss_fn(logits.float(), batch["label"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from mmcore.engine.loop import Trainer

    pipeline, model, optimizer, scheduler, loss_fn, batches = build(args.width, args.batch, args.steps, args.image_size)
    trainers = {
        progress: Trainer(
            model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
            device=pipeline.device, dtype=pipeline.dtype, grad_clip=1.0, progress=progress,
            channels_last=pipeline.channels_last,
        )
        for progress in (False, True)
    }
    plain_loop(model, optimizer, scheduler, loss_fn, batches[:3])  # warm-up
    times = {"plain loop": [], "engine": [], "engine + progress bar": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        plain_loop(model, optimizer, scheduler, loss_fn, batches)
        times["plain loop"].append(time.perf_counter() - started)
        for progress, name in ((False, "engine"), (True, "engine + progress bar")):
            started = time.perf_counter()
            trainers[progress].train_epoch(batches, 1, 1)
            times[name].append(time.perf_counter() - started)
    print(f"fake_cnn width {args.width}, {args.image_size}px, batch {args.batch}, {args.steps} steps x "
          f"{args.repeats} repeats, precision {pipeline.dtype or 'fp32'}, device {pipeline.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = statistics.median(times["plain loop"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24} {1000 * median / args.steps:8.2f} ms/step (median)   {median / base:.3f}x")
    ratio = statistics.median(times["engine"]) / base
    print(f"engine / plain = {ratio:.3f}x   target <= 1.05x: {'met' if ratio <= 1.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
