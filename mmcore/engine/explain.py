"""What the report needs from the model itself, run once more over the evaluated split.

- **Modality contribution** (multimodal runs): each sample's logit with the text features
  zeroed and with the image features zeroed — the same zeroing ``train.modality_dropout``
  trains with — and the mean of the fusion's gate where its output has one (the GMU's).
- **Saliency** (misclassified images): Grad-CAM (Captum's ``LayerGradCam``) on the vision
  encoder's last convolution, drawn over the image as the encoder saw it. Encoders without a
  convolution (ViT, SigLIP) and installs without Captum get a note instead.

:func:`explain_split` is the one call the run and ``mmcore eval`` make; it never fails the
evaluation: anything it cannot compute becomes a note in the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmcore.engine.runtime import autocast
from mmcore.engine.step import prepare_batch

SALIENCY_LIMIT = 50  # misclassified images given an overlay (each needs a backward pass)
SALIENCY_SIZE = 320
CAPTUM_MISSING = "saliency overlays need Captum: pip install 'mmcore[explain]'"


def explain_split(pipeline, split, *, temperature, misclassified=(), out_dir=None, files_dir="report_files"):
    """Per-sample explanations of ``split`` by ``pipeline.model``: a dict for :func:`write_evaluation`.

    Keys: ``index`` (dataset indices), ``logit_without_text``, ``logit_without_image``,
    ``gate_mean`` (arrays, or None when not multimodal / not gated), ``saliency``
    (``{index: file name under out_dir/files_dir}``) and ``notes`` (why something is absent).
    ``misclassified``: ``{dataset index: predicted class}`` of the samples to draw saliency for.
    """
    model = pipeline.model
    out = {"index": None, "logit_without_text": None, "logit_without_image": None, "gate_mean": None,
           "saliency": {}, "notes": [], "temperature": float(temperature)}
    if model.modality != "multimodal" and model.vision is None:
        return out
    dataset, split, _ = pipeline.dataset(split)
    loader = pipeline.loader(dataset)
    text_vectors = {}
    if model.modality == "multimodal":
        out.update(_modality_pass(model, loader, pipeline, keep_text_for=set(misclassified), text_vectors=text_vectors))
    if misclassified and out_dir is not None and model.vision is not None:
        chosen = dict(list(misclassified.items())[:SALIENCY_LIMIT])
        out["saliency"], note = _saliency(pipeline, split, chosen, text_vectors, Path(out_dir) / files_dir)
        if note:
            out["notes"].append(note)
    return out


@torch.no_grad()
def _modality_pass(model, loader, pipeline, *, keep_text_for, text_vectors):
    model.eval()
    indices, without_text, without_image, gates = [], [], [], []
    for batch in loader:
        if not batch["size"]:
            continue
        index = batch["index"]
        batch = prepare_batch(batch, pipeline.device, pipeline.channels_last)
        with autocast(pipeline.device, pipeline.dtype):
            vision = model.vision_features(batch)
            text = model.text_features(batch).to(vision.dtype)
            gate = model.fuse(vision, text).gate  # the full logit is the evaluated one: only its gate is new
            no_text = model.head(model.fuse(vision, torch.zeros_like(text)).fused)
            no_image = model.head(model.fuse(torch.zeros_like(vision), text).fused)
        indices.append(index)
        without_text.append(no_text.float().cpu().reshape(-1))
        without_image.append(no_image.float().cpu().reshape(-1))
        if gate is not None:
            gates.append(gate.float().reshape(len(index), -1).mean(dim=1).cpu())  # [B] or [B, k] -> [B]
        for k, i in enumerate(index.tolist()):
            if i in keep_text_for:
                text_vectors[i] = text[k].float().cpu()
    if not indices:
        return {}
    return {
        "index": torch.cat(indices).numpy(),
        "logit_without_text": torch.cat(without_text).double().numpy(),
        "logit_without_image": torch.cat(without_image).double().numpy(),
        "gate_mean": torch.cat(gates).double().numpy() if gates else None,
    }


def last_conv(module):
    """The last ``nn.Conv2d`` of ``module`` (its last feature map), or None."""
    found = None
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            found = child
    return found


def _saliency(pipeline, split, predicted, text_vectors, files_dir):
    """Grad-CAM overlays for ``{index: predicted class}`` -> ``({index: file name}, note or None)``.

    The map shows what pushed the logit towards the (wrong) predicted class: the logit itself
    for a predicted 1, its negative for a predicted 0.
    """
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        return {}, CAPTUM_MISSING
    from mmcore.data.dataset import SampleDataset

    model = pipeline.model
    layer = last_conv(model.vision)
    if layer is None:
        return {}, f"no saliency overlay: the vision encoder ({type(model.vision).__name__}) has no convolutional feature map"
    pipeline.encoder_on_device("vision")  # a frozen encoder left the GPU once its features were cached
    indices = list(predicted)
    dataset = SampleDataset(
        split.subset(indices), preprocessing=model.vision.preprocessing, needs_image=True,
        max_image_pixels=pipeline.recipe.data.max_image_pixels,
    )
    files_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    written = {}
    for position, index in enumerate(indices):
        item = dataset[position]
        if "vision" not in item:
            continue  # unreadable image: the report already shows a placeholder
        pixels = item["vision"]["pixel_values"].unsqueeze(0).to(pipeline.device).requires_grad_(True)
        rest = {k: v.unsqueeze(0).to(pipeline.device) for k, v in item["vision"].items() if k != "pixel_values"}
        text = text_vectors.get(index)
        sign = 1.0 if predicted[index] else -1.0

        def forward(x, rest=rest, text=text, sign=sign):
            batch = {"vision": {"pixel_values": x, **rest}}
            if model.modality == "multimodal":
                batch["text_feature"] = text.unsqueeze(0).to(pipeline.device)
            return sign * model(batch).logit.reshape(-1, 1)

        if model.modality == "multimodal" and text is None:
            continue
        with torch.enable_grad():
            cam = LayerGradCam(forward, layer).attribute(pixels, target=0, relu_attributions=True)
            cam = LayerAttribution.interpolate(cam, pixels.shape[-2:], interpolate_mode="bilinear")
        heat = cam[0, 0].detach().float().cpu().numpy()
        name = f"saliency_{int(index)}.jpg"
        _overlay(pixels[0].detach().float().cpu().numpy(), heat, model.vision.preprocessing).save(files_dir / name, quality=85)
        written[int(index)] = f"{files_dir.name}/{name}"
    return written, None


def _overlay(pixels, heat, preprocessing):
    """The encoder's input image (normalisation undone) with the heat map blended in."""
    from matplotlib import colormaps
    from PIL import Image

    mean = np.asarray(getattr(preprocessing, "mean", None) or (0.0,) * pixels.shape[0]).reshape(-1, 1, 1)
    std = np.asarray(getattr(preprocessing, "std", None) or (1.0,) * pixels.shape[0]).reshape(-1, 1, 1)
    image = pixels * std + mean
    if getattr(preprocessing, "mean", None) is None:  # unknown normalisation: stretch to [0, 1]
        image = (image - image.min()) / max(1e-8, image.max() - image.min())
    image = np.clip(image.transpose(1, 2, 0), 0, 1)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colored = colormaps["jet"](heat)[..., :3]
    blended = (0.55 * image + 0.45 * colored) * 255
    result = Image.fromarray(blended.astype(np.uint8))
    if max(result.size) != SALIENCY_SIZE:  # small encoder inputs are enlarged so the overlay is visible
        scale = SALIENCY_SIZE / max(result.size)
        result = result.resize((round(result.width * scale), round(result.height * scale)), Image.BILINEAR)
    return result
