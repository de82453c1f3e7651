"""Dataset and DataLoader: decoding, preprocessing and augmentation run in worker processes.

Each item carries either the encoder's raw input (``vision``: what the encoder's
preprocessing made) or precomputed features (``vision_feature`` / ``text_feature`` from
the feature cache), so training, evaluation and prediction share one forward.

Bytes through worker IPC are what a loader pays for, so items stay small: with
``uint8_pixels`` the workers hand over resized uint8 pixels (a quarter of float32's bytes)
and the model normalises them on the device (:func:`mmcore.model.classifier.device_pixels`,
in the classifier's input path); cached features stay float16 and are upcast on the device
(:func:`mmcore.engine.step.prepare_batch`). With a decoded-image cache (``decoded_images``)
the workers read the resized pixels from memory-mapped chunks instead of decoding the file;
augmentation is applied after it.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmcore.data.images import DEFAULT_FORMATS, BadImageError, load_rgb


class SampleDataset(Dataset):
    """Items of one split for the model.

    ``preprocessing`` (the vision encoder's) and ``augmentation`` are applied to decoded images
    when ``vision_features`` is None and the model needs images. Cached features are any
    indexable of per-sample arrays (e.g. a numpy memmap).
    """

    def __init__(
        self,
        split,
        *,
        preprocessing=None,
        augmentation=None,
        vision_features=None,
        vision_lengths=None,
        text_features=None,
        needs_image=True,
        max_image_pixels=89_478_485,
        image_formats=DEFAULT_FORMATS,
        uint8_pixels=False,
        decoded_images=None,
        teacher_logits=None,
        teacher_preprocessing=None,
    ):
        self.split = split
        self.preprocessing = preprocessing
        self.augmentation = augmentation
        self.vision_features = vision_features
        self.vision_lengths = vision_lengths
        self.text_features = text_features
        self.needs_image = needs_image and vision_features is None
        self.max_image_pixels = max_image_pixels
        self.image_formats = tuple(image_formats)
        # only a preprocessing whose output is normalize(uint8_item(image)) may split in two
        self.uint8_pixels = bool(uint8_pixels and preprocessing is not None and preprocessing.uint8_pixels)
        #: a FeatureView of flat uint8 rows (``preprocessing.resized`` of each image), or None
        self.decoded_images = decoded_images if self.uint8_pixels and preprocessing.plain_resize else None
        #: a distillation teacher's logit per sample (float32 [N]), or None: items then carry ``teacher_logit``
        self.teacher_logits = teacher_logits
        #: an online teacher's preprocessing, or None: items then carry ``teacher_vision``, the teacher's
        #: input made from the same (augmented) image the student sees, decoded from the file
        self.teacher_preprocessing = teacher_preprocessing

    @property
    def needs_workers(self):
        """Whether loader workers pay off: decoding, augmentation, or token sequences to batch
        (indexing a memmap of vectors is faster in-process)."""
        return self.needs_image or self.vision_lengths is not None

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        labels = self.split.labels
        item = {
            "index": index,
            "label": float(labels[index]) if labels is not None else -1.0,
            "text": self.split.texts[index],
        }
        if self.teacher_logits is not None:
            item["teacher_logit"] = float(self.teacher_logits[index])
        if self.vision_features is not None:
            feature = np.asarray(self.vision_features[index])
            if self.vision_lengths is not None:
                feature = feature[: int(self.vision_lengths[index])]
            # one copy out of the memmap, still float16: upcast on the device (prepare_batch)
            item["vision_feature"] = torch.from_numpy(np.array(feature))
        if self.text_features is not None:
            item["text_feature"] = torch.from_numpy(np.array(self.text_features[index]))
        if self.needs_image and self.decoded_images is not None and self.teacher_preprocessing is None:
            item["vision"] = {"pixel_values": self._decoded(index)}
        elif self.needs_image:
            try:
                image = load_rgb(
                    self.split.paths[index],
                    target_size=self._decode_size(),
                    max_pixels=self.max_image_pixels,
                    formats=self.image_formats,
                )
            except BadImageError as exc:
                item["error"] = f"{self.split.csv}: row {self.split.rows[index]}: {self.split.paths[index]}: {exc}"
                return item
            if self.augmentation is not None:
                image = self.augmentation(image)
            if self.teacher_preprocessing is not None:
                item["teacher_vision"] = self.teacher_preprocessing(image)
            if self.uint8_pixels:
                item["vision"] = self.preprocessing.uint8_item(image)
            else:
                item["vision"] = self.preprocessing(image)
        return item

    def _decode_size(self):
        """The size a JPEG may be decoded at: the student's, or the larger of it and an online teacher's."""
        size = self.preprocessing.target_size
        teacher = self.teacher_preprocessing.target_size if self.teacher_preprocessing is not None else None
        if size is None or teacher is None:
            return None if self.teacher_preprocessing is not None else size
        return (max(size[0], teacher[0]), max(size[1], teacher[1]))

    def _decoded(self, index):
        """The cached resized pixels of sample ``index`` (uint8 [3, H, W]), augmented when training."""
        h, w = self.preprocessing.size
        pixels = torch.from_numpy(np.array(self.decoded_images[index])).reshape(3, h, w)
        if self.augmentation is None:
            return pixels
        from torchvision.transforms.v2 import functional as F

        # the builtin augmentations keep the image's size: the result is at the working size
        image = self.augmentation(F.to_pil_image(pixels))
        pixels = F.pil_to_tensor(image)
        if tuple(pixels.shape[-2:]) != (h, w):
            pixels = F.resize(pixels, [h, w], antialias=True)
        return pixels


class Collate:
    """Batches items; bad images are reported in ``errors`` (the engine applies the policy)."""

    def __init__(self, preprocessing=None):
        self.preprocessing = preprocessing

    def __call__(self, items):
        errors = [item["error"] for item in items if "error" in item]
        bad = [item["index"] for item in items if "error" in item]
        items = [item for item in items if "error" not in item]
        batch = {"errors": errors, "bad_indices": bad}
        if not items:
            batch["size"] = 0
            return batch
        batch["size"] = len(items)
        batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        batch["label"] = torch.tensor([item["label"] for item in items], dtype=torch.float32)
        batch["text"] = [item["text"] for item in items]
        if "teacher_logit" in items[0]:
            batch["teacher_logit"] = torch.tensor([item["teacher_logit"] for item in items], dtype=torch.float32)
        if "teacher_vision" in items[0]:  # an online teacher collates its own inputs
            batch["teacher_vision"] = [item["teacher_vision"] for item in items]
        if "vision" in items[0]:
            batch["vision"] = self.preprocessing.collate([item["vision"] for item in items])
        if "vision_feature" in items[0]:
            batch.update(_stack_padded([item["vision_feature"] for item in items], "vision"))
        if "text_feature" in items[0]:
            batch["text_feature"] = torch.stack([item["text_feature"] for item in items])
        return batch


def _stack_padded(features, prefix):
    """Vectors stack; token sequences of different lengths are padded, with a mask.

    Sequences all of one length (a fixed-resolution encoder: always 729 tokens) stack as they
    are, with no copy into a padded buffer and no mask (``None``): pooling then runs mask-free,
    which lets fused attention kernels apply.
    """
    if features[0].dim() == 1:
        return {f"{prefix}_feature": torch.stack(features)}
    longest = max(f.shape[0] for f in features)
    if all(f.shape[0] == longest for f in features):
        return {f"{prefix}_tokens": torch.stack(features), f"{prefix}_mask": None}
    dim = features[0].shape[1]
    tokens = torch.zeros(len(features), longest, dim, dtype=features[0].dtype)
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    for i, f in enumerate(features):
        tokens[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return {f"{prefix}_tokens": tokens, f"{prefix}_mask": mask}


#: most loader workers one process starts for ``num_workers = -1``. Decoding is the loader's
#: cost and scales with cores (a JPEG at 120-140 img/s per core, a PNG at 8-58: docs/performance.md),
#: so every core a process may use gets a worker; the bound only keeps each worker's copy of
#: the split's rows (~1.5 KB per row) in check on very large machines
MAX_AUTO_WORKERS = 32


def default_num_workers():
    """Workers per process for ``num_workers = -1``: the CPU cores this process may use, shared
    by the processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), at most
    :data:`MAX_AUTO_WORKERS`, at least 1 (16 cores and one GPU: 16; 128 cores and 8 GPUs: 16 each)."""
    from mmcore.dist import local_world_size

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores // local_world_size()))


def seed_worker(worker_id):
    """Seed python/numpy in each worker from torch's per-worker seed (reproducible augmentation)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset,
    *,
    batch_size,
    shuffle=False,
    seed=0,
    num_workers=-1,
    sampler=None,
    batch_sampler=None,
    pin_memory=False,
    drop_last=False,
):
    """A DataLoader with seeded workers (and none when items are cached feature vectors).

    Workers are persistent, for training too: nothing they compute depends on their own
    random state or on the epoch they were started in. The batch sampler (in the main
    process) sets each epoch's order, and random augmentation is seeded per sample from
    (seed, epoch, position) (:class:`~mmcore.engine.sampling.SeededItems`), so an epoch's
    batches are the same from workers started at epoch 1 as from fresh ones after a resume.
    """
    if num_workers < 0:
        num_workers = default_num_workers()
    if not getattr(dataset, "needs_workers", getattr(dataset, "needs_image", True)):
        num_workers = 0  # cached vectors: indexing a memmap is faster in-process
    batches = len(batch_sampler) if batch_sampler is not None else len(dataset) // max(1, batch_size)
    num_workers = min(num_workers, max(1, batches))
    generator = torch.Generator()
    generator.manual_seed(seed)
    if batch_sampler is not None:
        batching = {"batch_sampler": batch_sampler}
    else:
        batching = {
            "batch_size": batch_size,
            "shuffle": shuffle if sampler is None else False,
            "sampler": sampler,
            "drop_last": drop_last,
        }
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=Collate(dataset.preprocessing),
        worker_init_fn=seed_worker,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # torch's default: two batches ready per worker is enough to hide decoding
        prefetch_factor=2 if num_workers > 0 else None,
    )
