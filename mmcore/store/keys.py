"""The cache's keys: what an entry is filed under.

Entries are keyed by content: the sha1 of an image file's bytes or of a text, so two CSVs that
share images share entries. Hashing every file on every run would read the whole dataset, so a
file's sha1 is remembered under its *stat key* (absolute path, size, mtime_ns, ctime_ns). A
changed stat key means the file is hashed again: if the bytes are the same (a copy, a
``touch``) the entries are reused, if not they are recomputed. ctime cannot be set by a user, so
even a rewrite that restores size and mtime is detected. A *feature space* (a directory of
entries) is keyed by the sha1 of its description (:func:`space_key`).
"""

from __future__ import annotations

import hashlib
import json
import os


def text_key(text):
    """A text's content key (20 bytes)."""
    return hashlib.sha1(text.encode("utf-8")).digest()


def read_key(stored):
    """A 20-byte key read back from an ``S20`` field: numpy drops its trailing NUL bytes, so a
    key ending in 0x00 (1 in 256) would otherwise never match again."""
    return stored.ljust(20, b"\0")


def stat_key(path, st=None):
    """A file's stat key (20 bytes): its absolute path, size, mtime and ctime; ``os.stat`` only
    (none when the caller already has the file's ``st``)."""
    st = os.stat(path) if st is None else st
    blob = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return hashlib.sha1(blob.encode("utf-8", "surrogateescape")).digest()


def weights_fingerprint(module):
    """sha1 over a module's state dict (names, dtypes, shapes, bytes): catches same-named
    encoders whose weights differ (random init with another seed, a moved ``main`` revision)."""
    import torch

    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def space_key(description):
    """The directory name of a feature space from its description dict."""
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:24]
