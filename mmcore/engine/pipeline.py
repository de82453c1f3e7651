"""How each split is fed to a built model: shared by training, ``eval --cache`` and ``predict --cache``.

The model itself is :func:`mmcore.engine.build.build_model`'s (a :class:`~mmcore.engine.build.RunModel`);
the :class:`Pipeline` over it decides what its inputs are: cached encoder outputs (a frozen
encoder's features in the store, decoded images, text features) or raw rows, the same for
every split, so a run's validation and a later ``mmcore eval --cache`` of the same CSV go
through the very same computation. Scoring raw rows without the cache is the scoring path's
(:mod:`mmcore.scoring`).
"""

from __future__ import annotations

import hashlib
import sys

import attrs

from mmcore.data.dataset import SampleDataset, make_loader
from mmcore.dist import all_gather_objects, barrier, rank, world_size
from mmcore.engine.build import build_model
from mmcore.engine.features import (
    decoded_store,
    fill_decoded_cache,
    fill_text_cache,
    fill_vision_cache,
    image_keys,
    text_store,
    vision_store,
)
from mmcore.model.trainability import is_frozen
from mmcore.store.keys import text_key
from mmcore.store.root import CacheUnavailable, cache_root, probe_cache, warn


class Pipeline:
    """A recipe's built model (:attr:`built`) and how each split is fed to it.

    ``built``: a :class:`~mmcore.engine.build.RunModel` already built (a restored run's);
    by default the recipe's model is built here.
    """

    def __init__(self, recipe, registry, *, source="recipe", progress=True, one_pass=False, use_cache=True, built=None):
        self.recipe = recipe
        self.registry = registry
        self.progress = progress
        #: scoring each row once (eval, predict): a decoded-image cache would cost a write per
        #: image and never be read again, so "auto" leaves it off
        self.one_pass = one_pass
        #: False: every encoder runs on the raw rows, nothing read from or written to the feature cache
        self.use_cache = use_cache
        #: the model, built and placed (:func:`~mmcore.engine.build.build_model`)
        self.built = built if built is not None else build_model(recipe, registry, source=source, progress=progress)
        self.model = self.built.model
        self.device = self.built.device
        self.dtype = self.built.dtype
        self.channels_last = self.built.channels_last
        self.augmentation = self.built.augmentation
        #: the augmentation's declared traits (``keeps_size``: it may run on decoded-cache pixels)
        self.augmentation_traits = self.built.augmentation_traits
        self._feature_cache = {}
        self._stores = {}
        #: what the feature stage reported ("vision features train.csv: 500/500 from cache ...")
        self.cache_log = []
        #: None until the cache directory was probed; then "" (usable) or the line saying why not
        self.cache_problem = None
        self._decoded_warned = False  # cache.decoded_images = true that cannot apply: said once

    # -- what is cached -------------------------------------------------------------------

    @property
    def cache_vision(self):
        """A frozen vision encoder with deterministic input: compute its outputs once."""
        return (
            self.caching
            and self.model.vision is not None
            and is_frozen(self.model.vision)
            and self.augmentation is None
            and self._cache_usable()
        )

    @property
    def cache_decoded(self):
        """Decoded-image cache: the vision encoder trains (its features cannot be cached) and
        the pixels before augmentation are a plain function of the file (``cache.decoded_images``)."""
        setting = self.recipe.cache.decoded_images
        vision = self.model.vision
        if setting is False or vision is None or not self.caching or self.cache_vision:
            return False
        if setting == "auto" and (is_frozen(vision) or self.one_pass):
            return False  # frozen with augmentation: decoding is cheap next to the frozen forward
        why = None
        if not vision.preprocessing.plain_resize:
            why = f"the preprocessing of {vision.name!r} ({type(vision.preprocessing).__name__}) is not a plain resize"
        elif self.augmentation is not None and not self.augmentation_traits.keeps_size:
            why = "the augmentation does not declare keeps_size (AugmentationTraits)"
        if why is not None:
            if setting is True and not self._decoded_warned:
                self._decoded_warned = True
                warn(f"warning: cache.decoded_images = true: {why}; images are decoded every epoch")
            return False
        return self._cache_usable()

    @property
    def caching(self):
        """The recipe's ``cache.enabled``, unless this pipeline was made with ``use_cache=False``."""
        return self.use_cache and self.recipe.cache.enabled

    @property
    def cache_text(self):
        """Text encoders are always frozen and texts fixed: cached whenever the cache is on."""
        return self.caching and self.model.text is not None and self._cache_usable()

    def _cache_usable(self):
        """Probe the cache directory once; a cache that cannot be written turns caching off."""
        if self.cache_problem is None:
            self.cache_problem = ""
            try:
                probe_cache(self.cache_root)
            except CacheUnavailable as exc:
                self._cache_failed(exc)
        return not self.cache_problem

    def _cache_failed(self, exc):
        """``cache.required``: stop with the line; else warn once and go on without the cache."""
        if self.recipe.cache.required:
            raise exc
        self.cache_problem = str(exc)
        self._feature_cache.clear()
        warn(f"warning: {exc}; continuing without the feature cache (cache.required = true would stop here)")

    @property
    def cache_root(self):
        return cache_root(self.recipe.cache.dir)

    @property
    def usable_cache_root(self):
        """The cache directory when this pipeline caches and the directory can be written, else None."""
        return self.cache_root if self.caching and self._cache_usable() else None

    def cache_summary(self):
        """results.json's ``feature_cache``: what was cached, and how the vision outputs were stored.

        ``vision_storage``: ``"vector"`` (pooled vectors), the token form (``cache.token_storage``:
        ``fp16``, ``int8``, ``pooled``), or None when vision is not cached.
        """
        storage = None
        if self.cache_vision:
            store = self._vision_store()
            storage = store.storage if store.tokens else "vector"
        return {"vision": self.cache_vision, "text": self.cache_text, "vision_storage": storage}

    # -- device memory --------------------------------------------------------------------

    def encoders_to_offload(self):
        """The frozen encoders whose outputs come from the cache: ``vision`` and/or ``text``.

        Once every split's features are cached, nothing runs them again in training or
        scoring; a frozen SigLIP2 SO400M keeps 3.3 GiB on the GPU, a LaBSE 1.75 GiB.
        """
        names = []
        if self.cache_vision:
            names.append("vision")
        if self.cache_text:
            names.append("text")
        return names

    def offload_cached_encoders(self):
        """Move :meth:`encoders_to_offload` off the GPU (:meth:`~mmcore.engine.build.RunModel.offload`)
        -> the names moved; :meth:`encoder_on_device` brings one back."""
        return self.built.offload(self.encoders_to_offload())

    def encoder_on_device(self, name):
        """Encoder ``name`` back on the run's device if it was offloaded -> the encoder."""
        return self.built.encoder_on_device(name)

    def _log(self, message):
        self.cache_log.append(message)
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def _on_wait(self, what):
        return lambda: self._log(f"{what}: waiting for another process filling the same cache")

    def _vision_store(self):
        if self._stores.get("vision") is None:
            pooling = self.recipe.pooling
            spec = {"name": pooling.name, "params": _plain(pooling.params)}
            self._stores["vision"] = vision_store(
                self.cache_root, self.model, dtype=self.dtype, pooling_spec=spec, token_storage=self.recipe.cache.token_storage
            )
        return self._stores["vision"]

    def _text_store(self):
        if self._stores.get("text") is None:
            self._stores["text"] = text_store(self.cache_root, self.model.text, dtype=self.dtype)
        return self._stores["text"]

    def _vision_features(self, split):
        """(view of the split's cached features, errors, bad positions); fills what is missing.

        Under torchrun each rank first fills its own shard, then (:func:`fill_in_parallel`)
        what its store still lacks is re-sharded, then whatever is left — bad images, which
        every rank needs to know about.
        """
        key = ("vision", split.csv, split.paths)
        if key in self._feature_cache:
            return self._feature_cache[key]
        store = self._vision_store()
        keys = image_keys(self.cache_root, split)
        cached = len(split) - len(store.missing(keys, refresh=True))
        if cached < len(split):
            self.encoder_on_device("vision")
        fill = dict(
            batch_size=self.eval_batch_size,
            device=self.device,
            dtype=self.dtype,
            num_workers=self.recipe.data.num_workers,
            max_image_pixels=self.recipe.data.max_image_pixels,
            image_formats=self.recipe.data.image_formats,
            progress=self.progress,
            on_wait=self._on_wait(f"vision features {split.csv.name}"),
        )
        fill_in_parallel(lambda **shard: fill_vision_cache(self.model, split, store, keys, **shard, **fill), store, keys)
        errors, bad, computed = fill_vision_cache(self.model, split, store, keys, **fill)
        self._log(
            f"vision features {split.csv.name}: {cached}/{len(split)} from cache"
            + (f", {len(split) - cached - len(bad)} computed" if cached < len(split) else "")
            + (f", {len(bad)} unreadable" if bad else "")
            + f" ({store.dir})"
        )
        skip = set(bad)
        keep = [i for i in range(len(split)) if i not in skip]
        view = store.view([keys[i] for i in keep])
        self._feature_cache[key] = (view, keep, errors)
        return self._feature_cache[key]

    def _decoded_images(self, split):
        """(view of the split's decoded pixels, kept positions, errors); decodes what is missing."""
        key = ("decoded", split.csv, split.paths)
        if key in self._feature_cache:
            return self._feature_cache[key]
        if self._stores.get("decoded") is None:
            self._stores["decoded"] = decoded_store(self.cache_root, self.model.vision)
        store = self._stores["decoded"]
        keys = image_keys(self.cache_root, split)
        cached = len(split) - len(store.missing(keys, refresh=True))
        fill = dict(
            preprocessing=self.model.vision.preprocessing,
            num_workers=self.recipe.data.num_workers,
            max_image_pixels=self.recipe.data.max_image_pixels,
            image_formats=self.recipe.data.image_formats,
            batch_size=self.eval_batch_size,
            progress=self.progress,
            on_wait=self._on_wait(f"decoded images {split.csv.name}"),
        )
        if world_size() > 1:
            fill_decoded_cache(split, store, keys, shard=(rank(), world_size()), **fill)
            barrier()
        errors, bad, _ = fill_decoded_cache(split, store, keys, **fill)
        self._log(
            f"decoded images {split.csv.name}: {cached}/{len(split)} from cache"
            + (f", {len(bad)} unreadable" if bad else "")
            + f" ({store.dir})"
        )
        skip = set(bad)
        keep = [i for i in range(len(split)) if i not in skip]
        self._feature_cache[key] = (store.view([keys[i] for i in keep]), keep, errors)
        return self._feature_cache[key]

    def _text_features(self, split):
        store = self._text_store()
        keys = [text_key(text) for text in split.texts]
        distinct = len(set(keys))
        missing = len({keys[i] for i in store.missing(keys, refresh=True)})
        if missing:
            self.encoder_on_device("text")
        precision = dict(device=self.device, dtype=self.dtype)  # the autocast of the step: the same features
        fill_in_parallel(
            lambda **shard: fill_text_cache(self.model.text, split.texts, store, progress=self.progress, **shard, **precision),
            store, keys,
        )
        fill_text_cache(
            self.model.text, split.texts, store, progress=self.progress, **precision,
            desc=f"text features {split.csv.name}", on_wait=self._on_wait(f"text features {split.csv.name}"),
        )
        self._log(f"text features {split.csv.name}: {distinct - missing}/{distinct} distinct texts from cache")
        return store.view(keys)

    @property
    def eval_batch_size(self):
        return self.recipe.eval.batch_size or self.recipe.train.batch_size

    def fit_encoders(self, train_split):
        """Fit encoders that learn from the training split (``fits_on_train``) on its texts.

        The split's texts are final (the OCR stage ran before). This runs before any feature is
        computed or cached, so the cache identity includes the fit. ``eval`` and ``predict`` never
        call it: they load the fitted state from the checkpoint.
        """
        text = self.model.text
        if text is None or not text.fits_on_train:
            return
        text.fit(list(train_split.texts))
        self._stores.pop("text", None)  # its identity changed with the fit
        self._log(f"text encoder {text.name}: fitted on {len(train_split)} training texts")

    def dataset(self, split, *, train=False):
        """A dataset for ``split``; bad images found by the feature pass go through ``bad``.

        Returns ``(dataset, split, errors)``: with cached vision features, images that could
        not be read are left out of the returned split and reported in ``errors``. Cached
        features are read from memory-mapped files, never loaded whole. Empty texts are filled
        (``data.ocr``) before, by the run's OCR stage (:func:`mmcore.ocr.fill.ocr_stage`).
        """
        try:
            split, vision_features, lengths, text_features, errors = self._cached_inputs(split)
            decoded = None
            if self.cache_decoded:
                decoded, keep, decode_errors = self._decoded_images(split)
                if len(keep) < len(split):
                    split = split.subset(keep)
                    text_features = text_features.subset(keep) if text_features is not None else None
                errors = errors + decode_errors
        except CacheUnavailable as exc:  # the disk filled up (or went away) while filling
            self._cache_failed(exc)
            vision_features = lengths = text_features = decoded = None
            errors = []
        dataset = SampleDataset(
            split,
            preprocessing=self.model.vision.preprocessing if self.model.vision is not None else None,
            augmentation=self.augmentation if train else None,
            vision_features=vision_features,
            vision_lengths=lengths,
            text_features=text_features,
            needs_image=self.model.vision is not None,
            max_image_pixels=self.recipe.data.max_image_pixels,
            image_formats=self.recipe.data.image_formats,
            uint8_pixels=True,
            decoded_images=decoded,
        )
        return dataset, split, errors

    def _cached_inputs(self, split):
        """(split, vision features, their lengths, text features, errors) from the feature cache."""
        vision_features = lengths = text_features = None
        errors = []
        if self.cache_vision:
            vision_features, keep, errors = self._vision_features(split)
            if len(keep) < len(split):
                split = split.subset(keep)
            lengths = vision_features.lengths
        if self.cache_text:
            text_features = self._text_features(split)
        return split, vision_features, lengths, text_features, errors

    def loader(self, dataset, *, train=False, sampler=None, batch_sampler=None, seed=None):
        batch_size = self.recipe.train.batch_size if train else self.eval_batch_size
        return make_loader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            seed=self.recipe.seed if seed is None else seed,
            num_workers=self.recipe.data.num_workers,
            sampler=sampler,
            batch_sampler=batch_sampler,
            pin_memory=self.device.type == "cuda",
        )


def fill_in_parallel(fill, store, keys):
    """Under torchrun: every rank fills its shard, then what is left is re-sharded.

    Left after the sharded pass is what another rank computed into a store this rank does
    not share (a node-local cache on another node): the ranks whose stores lack the very
    same entries (those of one node) split it between them, instead of one rank computing
    it all while the others wait past the process-group timeout. ``fill(shard=...,
    reshard=...)`` is one fill call. Returns after a barrier; the caller's last,
    unsharded call then only sees bad inputs (or what a failed write lost).
    """
    if world_size() == 1:
        return
    fill(shard=(rank(), world_size()))
    barrier()
    left = sorted({keys[i] for i in store.missing(keys, refresh=True) if keys[i] is not None})
    mine = _digest(left)
    group = [r for r, theirs in enumerate(all_gather_objects(mine)) if theirs == mine]
    if left:
        fill(shard=(group.index(rank()), len(group)), reshard=left)
    barrier()


def _digest(keys):
    """A short fingerprint of a sorted list of content keys (what ranks compare)."""
    return hashlib.sha1(b"".join(keys)).hexdigest()


def _plain(params):
    """Structured params -> a plain dict (for the cache key)."""
    if attrs.has(type(params)):
        return attrs.asdict(params)
    return params
