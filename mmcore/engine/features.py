"""The feature stage: run a frozen encoder once over a split, then train from its outputs.

What is stored follows the pooling: one vector per image when pooling has no parameters
(mean, cls), the token sequence (+ its length) when pooling trains (attention). Text
encoders always give one vector per text.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.dataset import SampleDataset, make_loader
from .runtime import autocast, to_device


def is_frozen(module):
    """True when no parameter of ``module`` trains."""
    return module is not None and not any(p.requires_grad for p in module.parameters())


def pooling_trains(pooling):
    return pooling is not None and any(True for _ in pooling.parameters())


@torch.no_grad()
def compute_vision_features(
    model, split, *, batch_size, device, dtype, num_workers, max_image_pixels, progress=True
):
    """Run ``model.vision`` over ``split`` -> (features, lengths or None, bad image messages, bad indices).

    ``features`` is float16: [N, D] pooled vectors, or [N, T, D] padded tokens with ``lengths``.
    """
    encoder, pooling = model.vision, model.pooling
    store_tokens = pooling_trains(pooling)
    dataset = SampleDataset(
        split, preprocessing=encoder.preprocessing, max_image_pixels=max_image_pixels
    )
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    encoder.eval()
    rows, lengths, errors, bad = {}, {}, [], []
    bar = tqdm(total=len(dataset), desc=f"vision features {split.csv.name}", unit="img", disable=not progress, leave=False)
    for batch in loader:
        errors.extend(batch["errors"])
        bad.extend(batch["bad_indices"])
        bar.update(batch["size"] + len(batch["bad_indices"]))
        if not batch["size"]:
            continue
        vision = to_device(batch["vision"], device)
        if encoder.channels_last and vision["pixel_values"].dim() == 4:
            vision["pixel_values"] = vision["pixel_values"].contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = encoder(**vision)
            result = out.tokens if store_tokens else pooling(out.tokens, out.mask)
        result = result.float().cpu()
        for j, index in enumerate(batch["index"].tolist()):
            if store_tokens:
                valid = out.mask[j].cpu()
                rows[index] = result[j][valid].half().numpy()
                lengths[index] = int(valid.sum())
            else:
                rows[index] = result[j].half().numpy()
    bar.close()
    return _assemble(rows, lengths if store_tokens else None, len(split)), errors, sorted(bad)


def _assemble(rows, lengths, n):
    """Dict of per-sample arrays -> one array (padded tokens + lengths when variable)."""
    first = next(iter(rows.values()))
    if lengths is None:
        out = np.zeros((n, *first.shape), dtype=np.float16)
        for i, row in rows.items():
            out[i] = row
        return out, None
    longest = max(lengths.values())
    out = np.zeros((n, longest, first.shape[-1]), dtype=np.float16)
    lens = np.zeros(n, dtype=np.int64)
    for i, row in rows.items():
        out[i, : row.shape[0]] = row
        lens[i] = row.shape[0]
    return out, lens


@torch.no_grad()
def compute_text_features(encoder, texts, *, device, progress=True, desc="text features"):
    """Embed every text once, in the encoder's batch size -> float16 [N, D]."""
    batch_size = max(1, getattr(encoder, "batch_size", 64))
    encoder.eval()
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        chunks.append(encoder(list(texts[start : start + batch_size])).float().cpu().half().numpy())
    return np.concatenate(chunks, axis=0)
