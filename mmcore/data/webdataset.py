"""WebDataset tar shards as a data source beside CSV (``data.format = "webdataset"``).

A split is named by shard URLs instead of a CSV: ``data.train = "shards/train-{000000..000099}.tar"``
(brace expansion; several patterns joined by ``::``), local paths (relative ones against
``data.base_dir``), ``file:`` URLs, ``pipe:COMMAND`` (the command writes the shard to stdout,
e.g. ``pipe:aws s3 cp s3://bucket/train-000000.tar -``), the ``http(s):`` / ``gs:`` / ``hf:``
schemes of the ``webdataset`` package, or any fsspec URL (``s3://...``) when fsspec and its
backend are installed.

The sample contract is the CSV's: per sample key, one image (``KEY.jpg``, ``.jpeg``, ``.png``,
``.webp``, ``.gif``, ``.bmp``, ``.tif``/``.tiff``), a label (``KEY.cls``: True/False, 1/0,
true/false) and a text (``KEY.txt``, UTF-8; missing = empty, filled by OCR when ``data.ocr``
is set). ``mmcore shard`` writes such shards from a CSV. Problems are reported like a CSV's,
every one at once, naming the shard and the sample key instead of the CSV and the row. A
member named twice for one key (two ``KEY.cls``: which label holds?), a member larger than
``data.max_image_bytes`` (refused from its tar header, unread) and a sparse member (its bytes
are not where training reads them) make the shard unusable: one line naming the shard, the
sample and the member.

Each shard is read once, sequentially: its samples' image bytes are hashed (the feature
cache's content key) and their headers scanned; the index (member offsets, hashes, header
facts, labels, texts) is remembered in the cache directory under the shard's stat key, so a
warm start costs one ``stat`` per shard. Under torchrun the shards no rank has indexed are
split between the ranks (rank r reads shards r, r + world, ...) and the indexes gathered.
Training reads an image by its offset in the (uncompressed) tar. A remote shard is copied
once into ``<cache>/v1/spool/`` (atomically) and read from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import attrs

from mmcore.data.images import DEFAULT_FORMATS, DEFAULT_MAX_IMAGE_BYTES, BadImageError, ImageSample
from mmcore.data.memo import ImageFacts, examine_bytes
from mmcore.data.split import Split, limited, parse_label
from mmcore.errors import DataError, os_error_reason
from mmcore.store.facts import formats_key

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
LABEL_EXTENSIONS = ("cls",)
TEXT_EXTENSIONS = ("txt",)
#: bump when what a shard index holds changes (older indexes are then rebuilt)
INDEX_VERSION = 1
LOCAL_SCHEMES = ("", "file")


@attrs.frozen
class ShardMember(ImageSample):
    """One sample's image inside a shard: where its bytes are, and what they are (:class:`ImageFacts`).

    Stands where a CSV split has an image path: :func:`~mmcore.data.images.open_image_file`
    opens it (:meth:`open_bytes`), the checks use its :attr:`facts`, messages use ``str()``.
    """

    url: str
    key: str
    shard: str
    name: str
    offset: int
    size: int
    facts: ImageFacts = attrs.field(eq=False, repr=False)

    def __str__(self):
        return f"{self.url}: sample {self.key}"

    @contextlib.contextmanager
    def open_bytes(self):
        """The image's bytes as a binary file object (one seek and one read of the tar)."""
        if not is_local(self.url) and not os.path.exists(self.shard):  # a remote shard not copied here yet
            try:
                ShardIndex(spool=Path(self.shard).parent)._stage(self.url, Path(self.shard))
            except DataError as exc:
                raise BadImageError(str(exc)) from None
        try:
            with open(self.shard, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as exc:
            raise BadImageError(f"cannot read shard {self.shard} ({os_error_reason(exc)[0]})") from None
        if len(data) != self.size:
            raise BadImageError(f"shard {self.shard} is shorter than its index (changed since it was read?)")
        yield io.BytesIO(data)


def expand_urls(pattern, base_dir=None):
    """Shard URLs of a recipe value: ``::``-separated patterns, braces expanded, local paths resolved."""
    from mmcore.kit.deps import require, require_extra

    require_extra("webdataset", 'data.format = "webdataset"')
    braceexpand = require("braceexpand", 'data.format = "webdataset"')

    urls = []
    for part in str(pattern).split("::"):
        part = part.strip()
        if not part:
            continue
        for url in braceexpand.braceexpand(part):
            scheme = urlparse(url).scheme
            if scheme == "file":
                url = urlparse(url).path
            elif scheme == "" and base_dir and not os.path.isabs(url):
                url = os.path.join(base_dir, url)
            urls.append(url)
    return urls


def is_local(url):
    """A path on this machine (no scheme, or ``file:``); a one-letter scheme is a Windows drive."""
    scheme = urlparse(url).scheme
    return scheme in LOCAL_SCHEMES or len(scheme) == 1


class ShardIndex:
    """Indexes of shards, remembered under their stat keys in ``root`` (in memory only without one).

    ``read_here`` lists the shards this process read (indexed or staged), in order.
    """

    def __init__(self, root=None, formats=DEFAULT_FORMATS, spool=None, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
        from mmcore.store.root import FORMAT

        self.formats = tuple(f.upper() for f in formats)
        self.root = Path(root) if root is not None else None
        self.dir = self.root / FORMAT / "shards" / formats_key(self.formats) if self.root is not None else None
        self.spool = Path(spool) if spool is not None else (self.root / FORMAT / "spool" if self.root else None)
        self.read_here = []
        #: ``data.max_image_bytes``: no member larger than this is read
        self.max_bytes = max_bytes

    def local_path(self, url):
        """Where the shard's bytes are on this machine: the path, or its spooled copy (made if missing)."""
        if is_local(url):
            return url
        target = self.spool_path(url)
        if not target.exists():
            self._stage(url, target)
        return str(target)

    def spool_path(self, url):
        """Where a remote shard is (or will be) copied on this machine."""
        if self.spool is None:
            raise DataError(f"{url}: a remote shard needs a cache directory to be copied into (cache.dir)")
        return self.spool / f"{hashlib.sha1(url.encode()).hexdigest()[:24]}.tar"

    def _stage(self, url, target):
        from mmcore.io import atomic_write

        self.read_here.append(url)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"{target.parent}: cannot copy shards here ({os_error_reason(exc)[0]})") from None
        try:
            with _open_url(url) as source, atomic_write(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
        except (OSError, ValueError) as exc:
            raise DataError(f"{url}: cannot read shard ({_short(exc)})") from None

    def samples(self, urls):
        """``{url: [sample dict, ...]}`` for every URL (remembered, or read: shared across torchrun ranks).

        Under torchrun every rank must call this with the same URLs.
        """
        from mmcore.dist import all_gather_objects, rank, world_size

        out, unknown = {}, []
        for url in urls:
            known = self._remembered(url)
            if known is None:
                unknown.append(url)
            else:
                out[url] = known
        world = world_size()
        if world > 1:
            everything = sorted(set().union(*all_gather_objects(unknown)))
            gathered = {}
            for part in all_gather_objects(self._read_all(everything[rank()::world])):
                gathered.update(part)
            out.update({url: gathered[url] for url in unknown})
        else:
            out.update(self._read_all(unknown))
        return {url: out[url] for url in urls}

    def _read_all(self, urls):
        """Index ``urls`` here: ``{url: samples}``, or ``{url: "problem line"}`` (raised by the caller)."""
        found = {}
        for url in urls:
            try:
                found[url] = self._read(url)
            except DataError as exc:
                found[url] = str(exc)
        return found

    def _memo_path(self, url):
        from mmcore.store.keys import stat_key

        if self.dir is None:
            return None
        try:
            local = url if is_local(url) else self.local_path(url) if self._staged(url) else None
            if local is None:
                return None
            return self.dir / f"{stat_key(local).hex()}.json"
        except (OSError, ValueError):
            return None

    def _staged(self, url):
        return self.spool is not None and self.spool_path(url).exists()

    def _remembered(self, url):
        path = self._memo_path(url)
        if path is None:
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if data.get("version") != INDEX_VERSION:
            return None
        return data["samples"]

    def _read(self, url):
        """Read one shard sequentially -> its sample dicts (remembered when there is a cache)."""
        from mmcore.io import atomic_write
        from mmcore.store.root import CacheUnavailable, cache_io, warn

        local = self.local_path(url)
        if is_local(url):
            self.read_here.append(url)
            if not os.path.isfile(local):
                raise DataError(f"{url}: shard not found" if not os.path.exists(local) else f"{url}: not a file")
        samples = _index_tar(url, local, self.formats, self.max_bytes)
        path = self._memo_path(url)
        if path is not None:
            try:
                with cache_io(self.root):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_write(path, "w", encoding="utf-8") as handle:
                        handle.write(json.dumps({"version": INDEX_VERSION, "url": url, "samples": samples}))
            except CacheUnavailable as exc:
                warn(f"warning: {exc}; shard indexes are not remembered")
        return samples


def _open_url(url):
    """A binary stream of a remote shard: the ``webdataset`` package's ``gopen`` (``pipe:``, http, ...),
    else fsspec for its URL schemes."""
    from webdataset.gopen import gopen, gopen_schemes

    scheme = urlparse(url).scheme
    if scheme in gopen_schemes:
        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"no reader for {scheme}: URLs (install fsspec and its {scheme} backend)") from None
    return fsspec.open(url, "rb").open()


def _index_tar(url, local, formats, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """Every sample of one uncompressed tar, in order: key, image member (offset, size), facts, label, text.

    Only the members read (images, labels, texts) are bounded by ``max_bytes``, from their tar
    headers before a byte of them is read.
    """
    samples, order, names = {}, [], set()
    last = None
    try:
        with tarfile.open(local, mode="r:") as tar:
            for member in tar:
                if not member.isfile():  # sparse members too (checked below)
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or base.startswith("."):
                    continue
                key = f"{directory}/{stem}" if directory else stem
                ext = ext.lower()
                _check_member(url, key, member, ext, names, max_bytes)
                sample = samples.get(key)
                if sample is None:
                    sample = samples[key] = {"key": key, "images": []}
                    order.append(key)
                last = key
                if ext in IMAGE_EXTENSIONS:
                    data = tar.extractfile(member).read()
                    facts = examine_bytes(data, formats)
                    sample["images"].append(
                        [member.name, member.offset_data, member.size, facts.sha1.hex(), facts.format,
                         facts.width, facts.height, facts.problem]
                    )
                elif ext in LABEL_EXTENSIONS:
                    sample["label"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                elif ext in TEXT_EXTENSIONS:
                    sample["text"] = tar.extractfile(member).read().decode("utf-8", "replace")
    except (tarfile.TarError, OSError, EOFError) as exc:
        after = f" after sample {last}" if last else ""
        raise DataError(f"{url}: damaged or not an uncompressed tar shard{after} ({_short(exc)})") from None
    return [samples[key] for key in order]


def _check_member(url, key, member, ext, names, max_bytes):
    """Refuse a member named twice for its key, one larger than ``max_bytes`` or a sparse one (one line each)."""
    name = f"{key}.{ext}"
    if name in names:
        raise DataError(f"{url}: sample {key}: {member.name} is in the shard twice (the last would silently "
                        f"win); write each member of a sample once")
    names.add(name)
    read = ext in IMAGE_EXTENSIONS or ext in LABEL_EXTENSIONS or ext in TEXT_EXTENSIONS
    if read and member.size > max_bytes:
        raise DataError(f"{url}: sample {key}: {member_too_large(member.name, member.size, max_bytes)}")
    if member.issparse():
        raise DataError(f"{url}: sample {key}: {member.name} is a sparse tar member (tar --sparse); "
                        f"write the shards with mmcore shard")


def member_too_large(name, size, max_bytes):
    """``NAME: too large (N bytes > data.max_image_bytes = M); it is not read``."""
    return f"{name}: too large ({size} bytes > data.max_image_bytes = {max_bytes}); it is not read"


def _short(exc):
    return (" ".join(str(exc).split()) or type(exc).__name__)[:160]


def read_shards(name, pattern, index, *, base_dir=None, require_label=True):
    """One split from shard URLs -> :class:`~mmcore.data.split.Split`, or :class:`DataError` listing every problem."""
    urls = expand_urls(pattern, base_dir)
    label = f"data.{name}"
    if not urls:
        raise DataError(f"{label}: no shard URL in {pattern!r}")
    found = index.samples(urls)
    problems = [value for value in found.values() if isinstance(value, str)]
    if problems:
        raise DataError(problems)
    paths, texts, labels, rows, raw = [], [], [], [], []
    no_image, bad_labels, two_images, too_large = [], [], [], []
    for url in urls:
        local = url if is_local(url) else str(index.spool_path(url))  # copied when first opened, if not yet
        for sample in found[url]:
            key = sample["key"]
            if not sample["images"]:
                no_image.append(f"{url}: sample {key}: no image (expected {key}.jpg, .png, .webp, ...)")
                continue
            if len(sample["images"]) > 1:
                names = ", ".join(image[0] for image in sample["images"])
                two_images.append(f"{url}: sample {key}: more than one image ({names})")
                continue
            member, offset, size, sha1, fmt, width, height, problem = sample["images"][0]
            if size > index.max_bytes:  # an index remembered under a larger data.max_image_bytes
                too_large.append(f"{url}: sample {key}: {member_too_large(member, size, index.max_bytes)}")
                continue
            value = sample.get("label")
            parsed = parse_label(value) if value is not None else None
            if parsed is None and (require_label or value):
                bad_labels.append(
                    f"{url}: sample {key}: no label ({key}.cls)" if value is None else
                    f"{url}: sample {key}: bad label {value!r} (expected True/False, 1/0 or true/false)"
                )
            facts = ImageFacts(bytes.fromhex(sha1), fmt, width, height, problem)
            paths.append(ShardMember(url, key, local, member, offset, size, facts))
            texts.append(" ".join(sample.get("text", "").split()))
            labels.append(parsed)
            rows.append(len(rows) + 1)
            raw.append(f"{url}#{key}")
    csv = Path(str(pattern))
    problems = (
        limited(no_image, "samples without an image", csv)
        + limited(two_images, "samples with two images", csv)
        + limited(too_large, "images too large", csv)
        + limited(bad_labels, "bad labels", csv)
    )
    if problems:
        raise DataError(problems)
    if not paths:
        raise DataError(f"{label}: {pattern}: no samples in {len(urls)} shards")
    return Split(
        csv=csv,
        paths=tuple(paths),
        texts=tuple(texts),
        labels=tuple(labels) if all(v is not None for v in labels) else None,
        rows=tuple(rows),
        raw_paths=tuple(raw),
    )


def load_shard_splits(data_config, *, names=("train", "val", "test"), cache=None, index=None):
    """Every split named in the recipe, from shards; problems of all of them at once.

    ``cache`` (the recipe's ``[cache]``): where shard indexes are remembered and remote shards
    copied; with ``enabled = false`` indexes are kept in memory only (remote shards still need a
    directory: the cache's). ``index``: a :class:`ShardIndex` to use instead (tests look at it).
    """
    if getattr(data_config, "ocr", None) is not None:
        raise DataError(
            'data.ocr: OCR fill is not available with data.format = "webdataset"; fill the texts first '
            "(mmcore ocr on the CSV), then write the shards with mmcore shard"
        )
    if index is None:
        from mmcore.store.root import FORMAT, cache_root

        root = cache_root(cache.dir if cache is not None else "")
        enabled = cache.enabled if cache is not None else True
        index = ShardIndex(root if enabled else None, data_config.image_formats, spool=root / FORMAT / "spool",
                           max_bytes=data_config.max_image_bytes)
    splits, problems = {}, []
    for name in names:
        try:
            splits[name] = read_shards(name, getattr(data_config, name), index, base_dir=data_config.base_dir or None)
        except DataError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataError(problems)
    return splits
