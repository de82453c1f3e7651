"""The feature stage: run a frozen encoder once per input, store its outputs on disk, train from them.

What is stored follows the pooling: one vector per image when pooling has no parameters
(mean, cls), the token sequence (its real tokens only) when pooling trains (attention). Text
encoders always give one vector per text. Outputs go to a :class:`~mmcore.store.features.FeatureStore`
(float16, or int8 tokens with ``cache.token_storage = "int8"``; memory-mapped when read); only inputs
without an entry are computed.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref

import torch

from mmcore.data.dataset import SampleDataset, make_loader
from mmcore.data.images import DECODE_VERSION, DEFAULT_FORMATS, ImageSample
from mmcore.dist import broadcast_object, is_main, world_size
from mmcore.engine.runtime import autocast
from mmcore.engine.step import prepare_batch
from mmcore.model.classifier import device_pixels
from mmcore.progress import progress_bar
from mmcore.store.features import FeatureStore, as_float16, stored_row_bytes
from mmcore.store.keys import text_key, weights_fingerprint
from mmcore.store.records import FileHashes
from mmcore.store.root import warn
from mmcore.store.space import check_space, human_bytes
from mmcore.store.tokens import TOKEN_STORAGES

#: module -> its weights fingerprint, computed once per process (the encoders it keys are frozen)
_FINGERPRINTS = weakref.WeakKeyDictionary()


def run_fingerprint(module):
    """:func:`~mmcore.store.keys.weights_fingerprint` of ``module``, once per run.

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


def pooling_trains(pooling):
    return pooling is not None and any(True for _ in pooling.parameters())


def _dtype_name(dtype):
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def vision_store(root, model, *, dtype, pooling_spec, token_storage="fp16"):
    """The feature space of ``model.vision`` (+ pooling when vectors are stored) under ``root``.

    ``pooling_spec`` describes the pooling (e.g. its recipe name and params); it is part of the
    key only when pooled vectors are stored. ``token_storage`` (``cache.token_storage``) is the
    stored form of token sequences, part of the key when it is not the plain ``fp16``.
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
    if stored == "tokens" and token_storage != "fp16":  # fp16 spaces keep the key they always had
        description["token_storage"] = token_storage
    if stored == "tokens" and token_storage == "pooled":  # pooling keeps a CLS token whole: the encoder says if there is one
        description["has_cls_token"] = encoder.has_cls_token
    return FeatureStore(root, description)


def text_store(root, encoder, *, dtype=None):
    """The feature space of a text encoder under ``root``, run under ``dtype`` autocast (None: fp32)."""
    description = {
        "kind": "text",
        "encoder": encoder.name,
        "identity": encoder.identity,
        "weights_sha1": run_fingerprint(encoder),
        "dtype": _dtype_name(dtype),
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
    """Content keys (sha1 of the bytes) of the split's images; None where unreadable.

    Samples of WebDataset shards and images in memory carry theirs (:class:`~mmcore.data.images.ImageSample`,
    hashed when the shard was indexed or the image taken in); a split may mix them with files.
    """
    carried = [isinstance(path, ImageSample) for path in split.paths]
    if all(carried):
        return [path.facts.sha1 for path in split.paths]
    files = iter(FileHashes(root).keys([path for path, own in zip(split.paths, carried) if not own]))
    return [path.facts.sha1 if own else next(files) for path, own in zip(split.paths, carried)]


def _shard(positions, keys, shard, reshard=None, groups=None):
    """This rank's part of ``positions``.

    The partition is of all the keys (not of what is missing when a rank happens to look),
    so ranks that start at different moments still agree on it. With ``reshard`` (the keys
    left after a sharded pass, which every rank of the group saw the same after a barrier)
    it is of those keys instead: a rank that takes the store's lock after another rank of
    its group filled its part still takes only its own part. With ``groups`` (one name per
    position: the WebDataset shard of each sample) whole groups are dealt out instead, so
    each rank reads its own shards.
    """
    rank, world = shard
    if world == 1:
        return positions
    if groups is not None and reshard is None:
        mine = set(sorted(set(groups))[rank::world])
        return [i for i in positions if groups[i] in mine]
    pool = keys if reshard is None else reshard
    mine = set(sorted({key or b"" for key in pool})[rank::world])
    return [i for i in positions if (keys[i] or b"") in mine]


def _shard_groups(split):
    """The shard URL of each sample of a WebDataset split (None for a CSV split)."""
    if split.paths and hasattr(split.paths[0], "shard"):
        return [path.url for path in split.paths]
    return None


def check_vision_space(store, split, todo, first_row, *, has_cls_token=False):
    """Refuse (:class:`~mmcore.store.space.CacheTooSmall`) a pass of ``todo`` rows the disk cannot hold.

    ``first_row``: one computed output, which says how long a token sequence is;
    ``has_cls_token``: the encoder's trait (the pooled form keeps a CLS token whole).
    """
    tokens = first_row.shape[0] if store.tokens else None

    def row_bytes_as(form):
        return stored_row_bytes({**store.description, "token_storage": form}, tokens, has_cls_token=has_cls_token)

    row_bytes = row_bytes_as(store.storage) if store.tokens else stored_row_bytes(store.description)
    options = "another cache.dir with room, or cache.enabled = false"
    if store.tokens:
        alternatives = [
            f'"{form}" ({human_bytes(len(todo) * row_bytes_as(form))})' for form in TOKEN_STORAGES if form != store.storage
        ]
        options = f"cache.token_storage = {' or '.join(alternatives)}, " + options
    what = f"vision features of {len(todo)} images of {split.csv.name} ({store.storage if store.tokens else 'vectors'})"
    return check_space(store.root, rows=len(todo), row_bytes=row_bytes, what=what, options=options)


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
    reshard=None,
    progress=True,
    on_wait=None,
    chunk_rows=None,
):
    """Compute the vision entries of ``split`` that ``store`` lacks -> (errors, bad positions, computed).

    ``keys`` are the images' content keys (:func:`image_keys`). With ``shard = (rank,
    world_size)`` only that rank's part of the missing images is computed (ranks fill
    disjoint parts at once; call again with the default shard after a barrier to pick up
    what is left, e.g. bad images); ``reshard`` (the keys left after a sharded pass) is
    partitioned instead of all the keys (see :func:`_shard`). Completed chunks survive an interruption.
    """
    encoder, pooling = model.vision, model.pooling
    store_tokens = store.description["stored"] == "tokens"
    store.ensure()
    with store.lock(shard, on_wait=on_wait):
        todo = _shard(store.missing(keys, refresh=True), keys, shard, reshard, _shard_groups(split))
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
        errors, bad, checked = [], [], False
        bar = progress_bar(progress, total=len(dataset), desc=f"vision features {split.csv.name}", unit="img")
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
                # fp16 on the device (half the bytes to copy), into pinned memory without waiting;
                # the batch's largest value travels with it and the writer thread refuses values
                # float16 cannot hold before storing them (read there, not here: no wait per batch)
                peak = _to_host(result.detach().abs().amax().float() if result.numel() else result.new_zeros(()))
                result = result.half()
                if not checked:  # before anything is stored: will it fit?
                    first = result[0][out.mask[0]] if store_tokens else result[0]
                    check_vision_space(store, split, todo, first.float().cpu().numpy(), has_cls_token=encoder.has_cls_token)
                    checked = True
                rows = _to_host(result)
                mask = _to_host(out.mask) if store_tokens else None
                batch_keys = [keys[todo[local]] for local in batch["index"].tolist()]
                background.put(batch_keys, rows, mask, peak=peak)
            background.close()
            writer.flush()
            line = background.pace.warning(store)
            if line:
                warn(line)
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
            for batch in progress_bar(progress, iterable=loader, desc=f"decoded images {split.csv.name}", unit="batch"):
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


#: a fill shorter than this says nothing about the disk (start-up dominates)
PACE_MIN_FILL_S = 20.0
#: the share of a fill spent waiting for the disk above which the fill says so
PACE_WAIT_SHARE = 0.10


class WritePace:
    """Whether the disk kept up with the encoder during one cache fill, in figures.

    ``written`` bytes took ``write_s`` seconds of the writer thread; the encoder waited
    ``wait_s`` seconds for a free queue slot (the disk behind) over a fill of ``elapsed_s``.
    """

    def __init__(self):
        self.started = time.perf_counter()
        self.rows = 0
        self.written = 0
        self.write_s = 0.0
        self.wait_s = 0.0
        self.elapsed_s = None

    def stop(self):
        self.elapsed_s = time.perf_counter() - self.started

    def warning(self, store, *, min_fill_s=None, wait_share=None):
        """One line with the figures when the fill waited on the disk more than :data:`PACE_WAIT_SHARE`
        of its time, else None. The storage is never changed: the line says what would keep up."""
        min_fill_s = PACE_MIN_FILL_S if min_fill_s is None else min_fill_s
        wait_share = PACE_WAIT_SHARE if wait_share is None else wait_share
        elapsed = self.elapsed_s if self.elapsed_s is not None else time.perf_counter() - self.started
        if elapsed < min_fill_s or not self.written or self.write_s <= 0 or self.wait_s / elapsed <= wait_share:
            return None
        disk = self.written / self.write_s
        produced = self.written / max(elapsed - self.wait_s, 1e-9)
        per_row = self.written / self.rows
        if store.tokens:
            others = [form for form in TOKEN_STORAGES if form != store.storage]
            suggestion = f"cache.token_storage = {' or '.join(repr(form) for form in others)} writes fewer bytes per image"
        else:
            suggestion = "vectors are already the smallest form"
        return (
            f"warning: the feature cache's writer did not keep up with the encoder: it wrote {disk / 1e6:.0f} MB/s "
            f"(encoding and disk), the encoder produced {produced / 1e6:.0f} MB/s ({human_bytes(per_row)} per image, "
            f"{store.storage if store.tokens else 'vectors'}), so the fill waited {self.wait_s / elapsed:.0%} of its "
            f"{elapsed:.0f} s; {suggestion}, or give cache.dir a faster disk (storage unchanged; bench/disk_rate.py "
            "measures both, docs/performance.md)"
        )


class BackgroundWriter:
    """Rows of computed batches -> a :class:`~mmcore.store.features.ChunkWriter`, on a thread.

    The main thread only queues (host tensor, event) pairs and goes on with the next batch;
    the thread waits for each copy, refuses values float16 cannot hold (each batch's peak
    came with it), splits the batch into rows (a token row is cut to its real tokens only
    where the mask is not all true) and commits chunks. A bounded queue keeps memory in
    check; the time the main thread waits for it and the thread's write time go to
    :attr:`pace`. An error in the thread is raised in the main thread at the next call.
    """

    def __init__(self, writer, *, depth=4):
        self.writer = writer
        self.pace = WritePace()
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._run, name="mmcore-cache-writer", daemon=True)
        self._thread.start()

    def put(self, keys, rows, mask=None, peak=None):
        """Queue one batch: ``rows``, ``mask`` and ``peak`` (its largest absolute value) as :func:`_to_host` gives them."""
        self._raise()
        started = time.perf_counter()
        self._queue.put((keys, rows, mask, peak))
        self.pace.wait_s += time.perf_counter() - started

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

    def _write(self, keys, rows, mask, peak):
        if peak is not None:
            as_float16(_wait(peak), self.writer.store)  # raises FeatureOverflow above float16's range
        rows = _wait(rows).numpy()
        mask = _wait(mask).numpy() if mask is not None else None
        started = time.perf_counter()
        description = self.writer.store.description
        for j, key in enumerate(keys):
            row = rows[j] if mask is None or mask[j].all() else rows[j][mask[j]]
            self.writer.add(key, row)
            self.pace.written += stored_row_bytes(description, row.shape[0] if row.ndim == 2 else None)
        self.pace.rows += len(keys)
        self.pace.write_s += time.perf_counter() - started

    def close(self, raise_error=True):
        """Write what is queued and stop the thread (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            self.pace.stop()
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


def fill_text_cache(
    encoder, texts, store, *, device=None, dtype=None, progress=True, desc="text features", on_wait=None,
    shard=(0, 1), reshard=None,
):
    """Embed the distinct texts ``store`` lacks, in the encoder's batch size -> how many were computed.

    The encoder runs under the same autocast (``device``, ``dtype``) as the training step and
    inference run it with the cache off, so its features do not depend on the cache.
    """
    keys = [text_key(text) for text in texts]
    store.ensure()
    with store.lock(shard, on_wait=on_wait):
        first = {}
        for i in store.missing(keys, refresh=True):
            first.setdefault(keys[i], i)
        todo = _shard(sorted(first.values()), keys, shard, reshard)
        if not todo:
            return 0
        check_space(
            store.root, rows=len(todo), row_bytes=stored_row_bytes(store.description), what=f"{desc} ({len(todo)} texts)",
            options="another cache.dir with room, or cache.enabled = false",
        )
        batch_size = max(1, getattr(encoder, "batch_size", 64))
        writer = store.writer()
        was_training = encoder.training
        encoder.eval()
        try:
            for start in progress_bar(progress, iterable=range(0, len(todo), batch_size), desc=desc, unit="batch"):
                part = todo[start : start + batch_size]
                with autocast(device, dtype):
                    vectors = encoder([texts[i] for i in part])
                vectors = as_float16(vectors, store).cpu().numpy()
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
