"""Where declared pretrained weights are on this machine, and whether the network can fetch the rest.

:func:`resolve_weights` looks each :class:`~mmcore.kit.weights.WeightRef` up on disk only: a
local path, the Hugging Face hub cache (``huggingface_hub.try_to_load_from_cache``: the
repo's ``config.json`` and one weights file), the torch hub cache (torchvision weights, timm
weights published by URL). What is not on disk is downloadable only when the network answers:
one short connection to the server (the Hugging Face endpoint, ``HF_ENDPOINT`` honoured; the
torch download host), once per process and host, through a proxy when one is set.
``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1`` skip the probe: no network.

When the Hugging Face endpoint does not answer, :func:`hub_online` turns ``huggingface_hub``'s
offline mode on for the rest of the process: transformers, sentence-transformers and timm then
read only their cache and fail at once when a file is missing, instead of retrying each file
for about 25 seconds.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import attrs

#: seconds one probe waits for the server to accept a connection
PROBE_TIMEOUT_S = 3.0
#: the Hugging Face endpoint when ``HF_ENDPOINT`` is not set
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
#: one of these in a hub repo's snapshot means its weights were downloaded
HUB_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
#: what timm downloads from a ``timm/...`` repo (the safetensors first)
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TRUE = {"1", "ON", "YES", "TRUE"}

#: (host, port) -> whether it accepted a connection; one probe per server and process
_REACHABLE: dict[tuple[str, int], bool] = {}


@attrs.frozen(kw_only=True)
class Resolved:
    """Where one :class:`~mmcore.kit.weights.WeightRef` is: on disk (``path``), to download, or missing.

    ``state``: ``"local"`` (a path the recipe names), ``"cached"`` (a hub or torch cache),
    ``"download"`` (not on disk, the server answers) or ``"missing"``; ``problem`` says why a
    missing one is missing; ``fetch`` is the command that downloads it where there is network.
    """

    ref: object
    state: str
    path: str = ""
    problem: str = ""
    fetch: str = ""
    server: str = ""

    @property
    def missing(self):
        return self.state == "missing"


# --- the network ---------------------------------------------------------------------------


def offline_by_env():
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` says there is no network."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint():
    """The Hugging Face server this process downloads from (``HF_ENDPOINT``, else huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT).rstrip("/")


def reachable(url):
    """True when the server of ``url`` (or the proxy that reaches it) accepts a TCP connection.

    One attempt of at most :data:`PROBE_TIMEOUT_S` per server and process, remembered: no retries.
    """
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or "", proxied.port or 80
    key = (host, port)
    if key not in _REACHABLE:
        try:
            socket.create_connection(key, timeout=PROBE_TIMEOUT_S).close()
            _REACHABLE[key] = True
        except OSError:
            _REACHABLE[key] = False
    return _REACHABLE[key]


def hub_online():
    """True when the Hugging Face hub can be reached; when it cannot, ``huggingface_hub`` goes offline.

    No probe when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set; one per process otherwise.
    """
    if offline_by_env():
        return False
    if reachable(hub_endpoint()):
        return True
    constants = _hub_constants()
    if constants is not None:
        # the documented switch is the environment variable, read at import; the libraries
        # read this constant on every call (huggingface_hub.is_offline_mode)
        constants.HF_HUB_OFFLINE = True
    return False


def _hub_constants():
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return constants


# --- on disk -------------------------------------------------------------------------------


def resolve_weights(refs):
    """Each ref -> its :class:`Resolved`, looked up on disk; the network is probed only for what is not there."""
    return [_resolve(ref) for ref in refs]


def _resolve(ref):
    if ref.source == "local":
        return _resolve_local(ref)
    if ref.source == "huggingface":
        files = (ref.files, ()) if ref.files else (("config.json",), HUB_WEIGHT_FILES)
        return _resolve_hub(ref, ref.id, ref.revision, *files, fetch=_hf_fetch(ref.id, ref.revision))
    if ref.source == "torchvision":
        return _resolve_torchvision(ref)
    return _resolve_timm(ref)


def _resolve_local(ref):
    path = Path(ref.id).expanduser()
    if path.exists():
        return Resolved(ref=ref, state="local", path=str(path.resolve()))
    return Resolved(ref=ref, state="missing", problem=f"no such file or directory: {path.resolve()}")


def hub_cache_dir():
    """The Hugging Face hub cache this process reads (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    constants = _hub_constants()
    if constants is None:
        return ""
    return str(constants.HF_HUB_CACHE)


def _resolve_hub(ref, repo_id, revision, required, any_of, *, fetch):
    """A hub repo: every file of ``required`` and one of ``any_of`` in the cache -> cached."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()

    def cached(name):
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache, revision=revision)
        return found if isinstance(found, str) else None  # None, or the marker of a file known not to exist

    try:
        found = [cached(name) for name in required]
        found.append(next(filter(None, map(cached, any_of)), None) if any_of else "")
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a repo id at all
        return Resolved(ref=ref, state="missing", problem=f"not a Hugging Face repo id nor an existing path ({exc})".splitlines()[0])
    if None not in found:  # every required file, and a weights file when one is asked for
        return Resolved(ref=ref, state="cached", path=str(Path(next(filter(None, found))).parent))
    return _downloadable(ref, hub_online(), hub_endpoint(), problem=f"not in the Hugging Face cache {cache}", fetch=fetch)


def _downloadable(ref, online, server, *, problem, fetch):
    state = "download" if online else "missing"
    return Resolved(ref=ref, state=state, problem=problem, fetch=fetch, server=server)


def _resolve_torch_url(ref, url, *, fetch):
    """A file torch.hub downloads from ``url``: in ``<torch hub>/checkpoints`` -> cached."""
    import torch.hub

    parsed = urllib.parse.urlsplit(url)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(parsed.path)
    if path.is_file():
        return Resolved(ref=ref, state="cached", path=str(path))
    server = f"{parsed.scheme}://{parsed.netloc}"
    online = not offline_by_env() and reachable(server)
    return _downloadable(ref, online, server, problem=f"not in the torch hub cache {folder}", fetch=fetch)


def _resolve_torchvision(ref):
    from torchvision.models import get_weight

    try:
        url = get_weight(ref.id).url
    except (KeyError, ValueError):
        return Resolved(ref=ref, state="missing", problem="torchvision has no such weights (see torchvision.models.list_models)")
    fetch = f"python -c \"import torchvision; torchvision.models.get_weight('{ref.id}').get_state_dict()\""
    return _resolve_torch_url(ref, url, fetch=fetch)


def _resolve_timm(ref):
    """A timm model's pretrained weights: its ``hf-hub:`` repo, the ``timm/...`` repo its tag names, or its URL."""
    fetch = f"python -c \"import timm; timm.create_model('{ref.id}', pretrained=True)\""
    if ref.id.startswith("hf-hub:"):
        repo, _, revision = ref.id.removeprefix("hf-hub:").partition("@")
        return _resolve_hub(ref, repo, revision or None, ("config.json",), HUB_WEIGHT_FILES + TIMM_WEIGHT_FILES, fetch=fetch)
    if ref.id.startswith("local-dir:"):
        return _resolve_local(attrs.evolve(ref, source="local", id=ref.id.removeprefix("local-dir:")))
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(ref.id)
    if cfg is None:
        return Resolved(ref=ref, state="missing", problem="timm has no pretrained weights of that name (see timm.list_pretrained())")
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else TIMM_WEIGHT_FILES
        return _resolve_hub(ref, cfg.hf_hub_id, None, (), files, fetch=fetch)
    if not cfg.url:
        return Resolved(ref=ref, state="missing", problem="timm names no download for these weights")
    return _resolve_torch_url(ref, cfg.url, fetch=fetch)


def _hf_fetch(repo_id, revision):
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
