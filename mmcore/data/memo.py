"""What the checks before a run learn about each image file, remembered by its stat key.

A run start looks at every image twice: the header scan (empty, not an image, format not
allowed, too large) and the content hash (duplicate / leakage check, OCR cache, feature
cache). Both depend on the file's bytes only, so both are remembered under the file's stat
key (absolute path, size, mtime_ns, ctime_ns: the key the feature cache's file-hash records
use) in ``<cache>/v1/checks/<formats>/``: a warm start costs one ``os.stat`` per file and reads
no image. A changed file has a new stat key and is read again (once: the hash and the
header scan share one read).

What is remembered is the header's facts (format, width, height) or the reason the header is
unusable; ``data.max_image_pixels`` is applied to the facts on every run, so changing it needs
no rescan. Changing ``data.image_formats`` does (another set of records): a format outside
the allow-list must never reach Pillow.

Under torchrun the cold work is shared: the files no rank knows are split between the ranks,
each reads its share, and the results are gathered, so every rank ends with every fact.
"""

from __future__ import annotations

import io
import os
import stat as stat_module
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs

from mmcore.data.bulk import paused_gc
from mmcore.data.images import DEFAULT_FORMATS, BadImageError, ImageSample, check_size, image_file_problem, open_checked
from mmcore.errors import os_error_reason
from mmcore.io import bytes_sha1
from mmcore.store.facts import FactRecords, RememberedFacts
from mmcore.store.keys import stat_key
from mmcore.store.root import CacheUnavailable, cache_root, warn

#: files read at once for their facts
_THREADS = 8
#: no size limit while scanning: ``data.max_image_pixels`` is applied to the remembered size
_NO_LIMIT = 2**62


@attrs.frozen
class ImageFacts:
    """What one image file's bytes say: their sha1, and the header's format and size or why it is unusable."""

    sha1: bytes | None
    format: str = ""
    width: int = 0
    height: int = 0
    #: a reason the file cannot be used whatever the size limit (None: the header is fine)
    problem: str | None = None

    def reason(self, max_pixels):
        """Why the image cannot be used under ``max_pixels`` (None when it can), as the header scan says it."""
        if self.problem is not None:
            return self.problem
        try:
            check_size(self.width, self.height, max_pixels=max_pixels)
        except BadImageError as exc:
            return str(exc)
        return None


def examine_bytes(data, formats=DEFAULT_FORMATS):
    """:class:`ImageFacts` of an image's bytes: one sha1 and one header read (no pixels decoded)."""
    digest = bytes_sha1(data)
    try:
        image = open_checked(io.BytesIO(data), max_pixels=_NO_LIMIT, formats=formats)
    except BadImageError as exc:
        return ImageFacts(digest, problem=str(exc))
    with image:
        return ImageFacts(digest, image.format or "", int(image.size[0]), int(image.size[1]))


def examine_file(path, formats=DEFAULT_FORMATS):
    """:class:`ImageFacts` of a file, reading it once (the problem of a file that cannot be read)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return ImageFacts(None, problem=image_file_problem(path) or f"cannot read file ({os_error_reason(exc)[0]})")
    return examine_bytes(data, formats)


class FileFacts:
    """:class:`ImageFacts` of image files, remembered under their stat keys in the cache directory.

    ``facts(paths)`` answers every path; without ``root`` (cache off) the facts are computed
    each run and kept in memory only. Hashes it computes also go to the feature cache's
    file-hash records, so the feature pass finds them too. Paths may also be samples of
    WebDataset shards (they carry their facts, remembered with the shard's index).
    """

    def __init__(self, root=None, formats=DEFAULT_FORMATS):
        self.formats = tuple(f.upper() for f in formats)
        self.root = Path(root) if root is not None else None
        #: where the facts are remembered (:mod:`mmcore.store.facts`); None: in memory only
        self._records = FactRecords(self.root, self.formats) if self.root is not None else None
        self._known = {}  # str(path) -> ImageFacts, for this process
        #: files this process read for their facts (the cold work; tests and the bench look at it)
        self.examined = 0

    def facts(self, paths, stats=None):
        """The :class:`ImageFacts` of each path, in order.

        ``stats``: the ``os.stat`` of each path when the caller already took it (a
        :class:`~mmcore.data.split.Split` carries them), so a warm start stats each file once.
        Under torchrun every rank must call this with the same paths (it gathers across ranks).
        """
        paths = list(paths)
        names = [str(p) for p in paths]
        stats = [None] * len(paths) if stats is None else list(stats)
        todo = {}
        for path, name, st in zip(paths, names, stats):
            if name not in self._known and name not in todo:
                if isinstance(path, ImageSample):  # a shard sample or an image in memory: hashed already
                    self._known[name] = path.facts
                else:
                    todo[name] = st
        if todo:  # decided on what this process knows, the same on every rank: ranks gather together
            with paused_gc():
                self._known.update(self._lookup(todo))
        return [self._known[name] for name in names]

    __call__ = facts

    def _lookup(self, names):
        """Facts of files not known in this process: remembered ones by stat key, the rest read.

        ``names``: file name -> its ``os.stat`` when already taken (else None: stat it here)."""
        out, unknown, keys = {}, [], {}
        remembered = self._records.load() if self._records is not None else RememberedFacts()
        for name, st in names.items():
            try:
                st = os.stat(name) if st is None else st
            except (OSError, ValueError):
                out[name] = ImageFacts(None, problem=image_file_problem(name) or "cannot read file")
                continue
            if not stat_module.S_ISREG(st.st_mode):
                out[name] = ImageFacts(None, problem=image_file_problem(name))
                continue
            key = stat_key(name, st)
            facts = remembered.get(key)
            if facts is None:
                unknown.append(name)
                keys[name] = key
            else:
                out[name] = ImageFacts(*facts)
        computed = self._examine_shared(unknown)
        out.update(computed)
        mine = {keys[n]: (f.sha1, f.format, f.width, f.height, f.problem)
                for n, f in computed.items() if n in keys and f.sha1 is not None}
        if mine and self._records is not None:
            try:
                self._records.save(mine, remembered)
            except CacheUnavailable as exc:  # the checks still hold; the next run reads again
                warn(f"warning: {exc}; image checks are not remembered")
        return out

    def _examine_shared(self, names):
        """Read ``names`` for their facts; under torchrun each rank reads its share of every rank's list."""
        from mmcore.dist import all_gather_objects, rank, world_size

        world = world_size()
        if world == 1:
            return self._examine(names)
        everything = sorted(set().union(*all_gather_objects(names)))
        share = everything[rank()::world]
        gathered = {}
        for part in all_gather_objects(self._examine(share)):
            gathered.update(part)
        return {name: gathered[name] for name in names}

    def _examine(self, names):
        if not names:
            return {}
        self.examined += len(names)
        with ThreadPoolExecutor(max_workers=min(_THREADS, len(names))) as pool:
            return dict(zip(names, pool.map(lambda n: examine_file(n, self.formats), names)))


class ImageHashes:
    """The content keys (sha1 of the bytes) of one run's image files, each file read once.

    Called as ``hashes(paths)``, it is shared by the header scan, the duplicate check, the OCR
    fill and (through the cache's file records, which it writes when ``root`` is given) the
    feature cache. Its :attr:`facts` (:class:`FileFacts`) remember each
    file's hash and header facts by stat key, so a warm start reads no image. Without
    ``root`` (cache off) they live only in memory.
    """

    def __init__(self, root=None, formats=DEFAULT_FORMATS):
        self.facts = FileFacts(root, formats)

    @classmethod
    def for_recipe(cls, recipe):
        """Remembered in the recipe's cache when the cache is on, else in memory only."""
        root = cache_root(recipe.cache.dir) if recipe.cache.enabled else None
        return cls(root, recipe.data.image_formats)

    def __call__(self, paths):
        """The key of each path (None where the file cannot be read), in order."""
        return [facts.sha1 for facts in self.facts(paths)]
