"""Click options that several commands share: recipe overrides (``--set``), where a model scores
(``--device``) and how a bundle is checked."""

from __future__ import annotations

import click

from mmcore.errors import MmcoreError


def _device(ctx, param, value):
    from mmcore.devices import parse_device

    try:
        return parse_device(value)
    except MmcoreError as exc:
        raise click.BadParameter(str(exc).partition(": ")[2]) from None


#: ``--device auto|cpu|cuda[:N]`` (``predict``, ``eval``, ``serve``): CUDA asked for and missing is one line (exit 1)
device_option = click.option(
    "--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]", callback=_device,
    help="Where the model scores: auto (the GPU when there is one), cpu, cuda or cuda:N. CUDA asked for and "
         "missing is an error, never a silent CPU fallback.")
#: ``--verify`` (bundles): hash every file, even when this machine verified the bundle before
verify_option = click.option(
    "--verify", is_flag=True, default=None,
    help="Bundles: check every file's sha256 now (by default once per bundle and machine; sizes always).")
#: ``--cache`` (runs): score through the training feature cache
cache_option = click.option(
    "--cache", is_flag=True,
    help="Runs: read and fill the feature cache as training did (float16 features; faster when the same "
         "images are scored again). By default nothing is read from or written to it, and scores are float32.")
#: ``--set KEY=VALUE`` (``run``, ``show``, ``demo``, ``tune``): a recipe override, repeatable
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe key, e.g. --set train.batch_size=32 (repeatable).")
