"""The feature stage: run a frozen encoder once per input, store its outputs on disk, train from them.

What is stored follows the pooling: one vector per image when pooling has no parameters
(mean, cls), the token sequence (its real tokens only) when pooling trains (attention). Text
encoders always give one vector per text. Outputs go to a :class:`~mmcore.engine.cache.FeatureStore`
(float16, memory-mapped when read); only inputs without an entry are computed.
"""

from __future__ import annotations

import queue
import threading
import weakref

import torch
from tqdm.auto import tqdm

from mmcore.data.dataset import SampleDataset, device_pixels, make_loader
from mmcore.data.images import DECODE_VERSION, DEFAULT_FORMATS
from mmcore.engine.cache import FeatureStore, FileHashes, cache_root, text_key, weights_fingerprint
from mmcore.engine.runtime import autocast, broadcast_object, is_main, world_size
from mmcore.engine.step import prepare_batch

#: module -> its weights fingerprint, computed once per process (the encoders it keys are frozen)
_FINGERPRINTS = weakref.WeakKeyDictionary()


def run_fingerprint(module):
    """:func:`~mmcore.engine.cache.weights_fingerprint` of ``module``, once per run.

    Hashing 400M parameters takes seconds: it is computed once per module and process, and
    under torchrun by rank 0 only and broadcast (every rank built the same weights, seeded).
    Only for frozen encoders, whose weights do not change during the run.
    """
    known = _FINGERPRINTS.get(module)
    if known is None:
        if world_size() > 1:
            known = broadcast_object(weights_fingerprint(module) if is_main() else None)
        else:
            known = weights_fingerprint(module)
        _FINGERPRINTS[module] = known
    return known


def is_frozen(module):
    """True when no parameter of ``module`` trains."""
    return module is not None and not any(p.requires_grad for p in module.parameters())


def pooling_trains(pooling):
    return pooling is not None and any(True for _ in pooling.parameters())


def _dtype_name(dtype):
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def vision_store(root, model, *, dtype, pooling_spec):
    """The feature space of ``model.vision`` (+ pooling when vectors are stored) under ``root``.

    ``pooling_spec`` describes the pooling (e.g. its recipe name and params); it is part of the
    key only when pooled vectors are stored.
    """
    encoder, pooling = model.vision, model.pooling
    stored = "tokens" if pooling_trains(pooling) else "vector"
    description = {
        "kind": "vision",
        "encoder": encoder.name,
        "identity": encoder.identity,
        "decode_version": DECODE_VERSION,
        "weights_sha1": run_fingerprint(encoder),
        "dtype": _dtype_name(dtype),
        "stored": stored,
        "pooling": None if stored == "tokens" else {"spec": pooling_spec, "class": type(pooling).__qualname__},
        "dim": encoder.out_dim,
    }
    return FeatureStore(root, description)


def text_store(root, encoder):
    """The feature space of a text encoder under ``root``."""
    description = {
        "kind": "text",
        "encoder": encoder.name,
        "identity": encoder.identity,
        "weights_sha1": run_fingerprint(encoder),
        "dtype": "fp32",
        "stored": "vector",
        "dim": encoder.out_dim,
    }
    return FeatureStore(root, description)


def decoded_store(root, encoder):
    """The decoded-image space of ``encoder``'s preprocessing: each image decoded and resized
    once (``preprocessing.resized``), stored as flat uint8 rows of 3 x H x W.

    Keyed like the feature cache: the file's content key per entry; the preprocessing's
    description and :data:`DECODE_VERSION` name the space, so a changed file or preprocessing
    is never served stale pixels. The weights play no part (pixels do not depend on them).
    """
    preprocessing = encoder.preprocessing
    h, w = preprocessing.size
    description = {
        "kind": "decoded",
        "encoder": encoder.name,
        "identity": f"pixels {h}x{w} of {encoder.name}",
        "preprocessing": preprocessing.describe(),
        "decode_version": DECODE_VERSION,
        "dtype": "uint8",
        "row_dtype": "uint8",
        "stored": "pixels",
        "dim": 3 * h * w,
    }
    return FeatureStore(root, description)


def image_keys(root, split):
    """Content keys (sha1 of the bytes) of the split's images; None where unreadable."""
    return FileHashes(root).keys(split.paths)


class ImageHashes:
    """The content keys (sha1 of the bytes) of one run's image files, each file hashed once.

    Called as ``hashes(paths)``, it is shared by the duplicate check, the OCR fill and (through
    the cache's file records, which it writes when ``root`` is given) the feature cache, so a
    run reads each image's bytes for hashing once. Without ``root`` (cache off) the keys live
    only in memory.
    """

    def __init__(self, root=None):
        self._files = FileHashes(root) if root is not None else None
        self._known = {}

    @classmethod
    def for_recipe(cls, recipe):
        """Remembered in the recipe's cache when the cache is on, else in memory only."""
        return cls(cache_root(recipe.cache.dir) if recipe.cache.enabled else None)

    def __call__(self, paths):
        """The key of each path (None where the file cannot be read), in order."""
        from mmcore.data.checks import hash_files

        paths = [str(p) for p in paths]
        new = list(dict.fromkeys(p for p in paths if p not in self._known))
        if new:
            keys = self._files.keys(new) if self._files is not None else hash_files(new)
            self._known.update(zip(new, keys))
        return [self._known[p] for p in paths]


def _shard(positions, keys, shard):
    """This rank's part of ``positions``.

    The partition is of all the keys (not of what is missing when a rank happens to look),
    so ranks that start at different moments still agree on it.
    """
    rank, world = shard
    if world == 1:
        return positions
    mine = set(sorted({key or b"" for key in keys})[rank::world])
    return [i for i in positions if (keys[i] or b"") in mine]


@torch.no_grad()
def fill_vision_cache(
    model,
    split,
    store,
    keys,
    *,
    batch_size,
    device,
    dtype,
    num_workers,
    max_image_pixels,
    image_formats=DEFAULT_FORMATS,
    shard=(0, 1),
    progress=True,
    on_wait=None,
    chunk_rows=None,
):
    """Compute the vision entries of ``split`` that ``store`` lacks -> (errors, bad positions, computed).

    ``keys`` are the images' content keys (:func:`image_keys`). With ``shard = (rank,
    world_size)`` only that rank's part of the missing images is computed (ranks fill
    disjoint parts at once; call again with the default shard after a barrier to pick up
    what is left, e.g. bad images). Completed chunks survive an interruption.
    """
    encoder, pooling = model.vision, model.pooling
    store_tokens = store.description["stored"] == "tokens"
    store.ensure()
    with store.lock(shard, on_wait=on_wait):
        todo = _shard(store.missing(keys, refresh=True), keys, shard)
        if not todo:
            return [], [], 0
        dataset = SampleDataset(
            split.subset(todo), preprocessing=encoder.preprocessing, max_image_pixels=max_image_pixels,
            image_formats=image_formats, uint8_pixels=True,
        )
        loader = make_loader(
            dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
        )
        writer = store.writer(**({"chunk_rows": chunk_rows} if chunk_rows else {}))
        background = BackgroundWriter(writer)
        was_training = encoder.training
        encoder.eval()
        errors, bad = [], []
        bar = tqdm(
            total=len(dataset), desc=f"vision features {split.csv.name}", unit="img",
            disable=not progress, leave=False,
        )
        try:
            for batch in loader:
                errors.extend(batch["errors"])
                bad.extend(todo[i] for i in batch["bad_indices"])
                bar.update(batch["size"] + len(batch["bad_indices"]))
                if not batch["size"]:
                    continue
                vision = device_pixels(prepare_batch(batch, device, encoder.channels_last)["vision"],
                                       encoder.preprocessing)
                with autocast(device, dtype):
                    out = encoder(**vision)
                    result = out.tokens if store_tokens else pooling(out.tokens, out.mask)
                # fp16 on the device (half the bytes to copy), into pinned memory without waiting
                rows = _to_host(result.to(torch.float16))
                mask = _to_host(out.mask) if store_tokens else None
                batch_keys = [keys[todo[local]] for local in batch["index"].tolist()]
                background.put(batch_keys, rows, mask)
            background.close()
            writer.flush()
        except BaseException:
            background.close(raise_error=False)
            _save_partial(writer)
            raise
        finally:
            bar.close()
            encoder.train(was_training)
        return errors, sorted(bad), writer.written


@torch.no_grad()
def fill_decoded_cache(split, store, keys, *, preprocessing, num_workers, max_image_pixels,
                       image_formats=DEFAULT_FORMATS, batch_size=64, shard=(0, 1), progress=True, on_wait=None):
    """Decode and resize the images of ``split`` that ``store`` lacks -> (errors, bad positions, written).

    The loader workers decode in parallel; the rows (``preprocessing.resized``, uint8) go to
    the store as they come. Like :func:`fill_vision_cache`: sharded under torchrun, completed
    chunks survive an interruption.
    """
    store.ensure()
    with store.lock(shard, on_wait=on_wait):
        todo = _shard(store.missing(keys, refresh=True), keys, shard)
        if not todo:
            return [], [], 0
        dataset = SampleDataset(
            split.subset(todo), preprocessing=preprocessing, max_image_pixels=max_image_pixels,
            image_formats=image_formats, uint8_pixels=True,
        )
        loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers)
        writer = store.writer()
        errors, bad = [], []
        try:
            for batch in tqdm(loader, desc=f"decoded images {split.csv.name}", unit="batch", disable=not progress,
                              leave=False):
                errors.extend(batch["errors"])
                bad.extend(todo[i] for i in batch["bad_indices"])
                if not batch["size"]:
                    continue
                pixels = batch["vision"]["pixel_values"].reshape(batch["size"], -1).numpy()
                for j, local in enumerate(batch["index"].tolist()):
                    writer.add(keys[todo[local]], pixels[j])
            writer.flush()
        except BaseException:
            _save_partial(writer)
            raise
        return errors, sorted(bad), writer.written


def _to_host(tensor):
    """``tensor`` copied to the host: into pinned memory without waiting on CUDA (the writer
    thread waits for the copy), a plain view on the CPU. -> (host tensor, CUDA event or None)."""
    if tensor.device.type != "cuda":
        return tensor.detach(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class BackgroundWriter:
    """Rows of computed batches -> a :class:`~mmcore.engine.cache.ChunkWriter`, on a thread.

    The main thread only queues (host tensor, event) pairs and goes on with the next batch;
    the thread waits for each copy, splits the batch into rows (a token row is cut to its real
    tokens only where the mask is not all true) and commits chunks. A bounded queue keeps
    memory in check; an error in the thread is raised in the main thread at the next call.
    """

    def __init__(self, writer, *, depth=4):
        self.writer = writer
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._run, name="mmcore-cache-writer", daemon=True)
        self._thread.start()

    def put(self, keys, rows, mask=None):
        """Queue one batch: ``rows`` and ``mask`` as :func:`_to_host` gives them."""
        self._raise()
        self._queue.put((keys, rows, mask))

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain: the main thread reports the error
            try:
                self._write(*item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self._error = exc

    def _write(self, keys, rows, mask):
        rows = _wait(rows).numpy()
        mask = _wait(mask).numpy() if mask is not None else None
        for j, key in enumerate(keys):
            if mask is None or mask[j].all():
                self.writer.add(key, rows[j])
            else:
                self.writer.add(key, rows[j][mask[j]])

    def close(self, raise_error=True):
        """Write what is queued and stop the thread (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error:
            self._raise()

    def _raise(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _wait(pair):
    tensor, event = pair
    if event is not None:
        event.synchronize()
    return tensor


@torch.no_grad()
def fill_text_cache(encoder, texts, store, *, progress=True, desc="text features", on_wait=None, shard=(0, 1)):
    """Embed the distinct texts ``store`` lacks, in the encoder's batch size -> how many were computed."""
    keys = [text_key(text) for text in texts]
    store.ensure()
    with store.lock(shard, on_wait=on_wait):
        first = {}
        for i in store.missing(keys, refresh=True):
            first.setdefault(keys[i], i)
        todo = _shard(sorted(first.values()), keys, shard)
        if not todo:
            return 0
        batch_size = max(1, getattr(encoder, "batch_size", 64))
        writer = store.writer()
        was_training = encoder.training
        encoder.eval()
        try:
            for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
                part = todo[start : start + batch_size]
                vectors = encoder([texts[i] for i in part]).float().cpu().half().numpy()
                for i, vector in zip(part, vectors):
                    writer.add(keys[i], vector)
            writer.flush()
        except BaseException:
            _save_partial(writer)
            raise
        finally:
            encoder.train(was_training)
        return writer.written


def _save_partial(writer):
    """On an interruption, commit the rows already computed (each one is complete)."""
    try:
        writer.flush()
    except Exception:  # noqa: BLE001 - the original error matters more
        pass
