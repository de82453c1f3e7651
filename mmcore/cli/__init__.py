"""The ``mmcore`` command line: thin click commands over :mod:`mmcore.commands`."""

from mmcore.cli.main import cli, main

__all__ = ["cli", "main"]
