"""``mmcore shard CSV --out DIR --size 1GB``: WebDataset shards from a split CSV (:mod:`mmcore.data.shards`:
atomic, verified, resumable)."""

from __future__ import annotations

from mmcore.data.shards import parse_size, write_shards


def shard_csv(csv, out_dir, *, size="1GB", base_dir=None, max_image="50MB", echo=print):
    """Write the rows of ``csv`` as tar shards of at most ``size`` into ``out_dir``; returns the manifest.

    ``size`` and ``max_image`` (the largest image file, a recipe's ``data.max_image_bytes``) are
    sizes as ``1GB``, ``500MB``, ``2GiB`` or bytes: use :func:`read_sizes` to check them first.
    """
    sizes = read_sizes(size=size, max_image=max_image)
    manifest = write_shards(csv, out_dir, max_bytes=sizes["size"], base_dir=base_dir,
                            max_image_bytes=sizes["max_image"], echo=echo)
    echo(f"{manifest['rows']} samples in {len(manifest['shards'])} shards: {manifest['pattern']}")
    return manifest


def read_sizes(**sizes):
    """``{name: bytes}`` of ``{name: "1GB"}``; a size that cannot be read raises ``ValueError`` naming why."""
    return {name: parse_size(text) for name, text in sizes.items()}
