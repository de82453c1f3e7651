"""``mmcore new-plugin``."""

from __future__ import annotations

from pathlib import Path

import click

from mmcore.commands.new_plugin import KINDS, ScaffoldError, _already_registered, plugin_names, write_plugin


class _OneLineError(click.ClickException):
    """Print just the message (no "Error:" prefix or usage), like the other mmcore commands."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None):
        click.echo(self.format_message(), err=True)


@click.command("new-plugin")
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(KINDS), help="What the plugin provides.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    help="Folder to create (default: plugins/<kind>-<name> in the current directory).",
)
def new_plugin_command(name, kind, directory):
    """Write a new plugin package providing the encoder NAME, ready to pip install and test."""
    try:
        names = plugin_names(name, kind)
        target = write_plugin(name, kind, directory)
    except ScaffoldError as exc:
        raise _OneLineError(str(exc), exc.exit_code) from None
    click.echo(f"wrote {target}/ ({names.dist}, module {names.module}, {kind} encoder {name!r})")
    owner = _already_registered(names)
    if owner is not None:
        click.echo(
            f"note: {kind} encoder {name!r} is already registered by {owner}; "
            f"installing both is an error — rename it or uninstall {owner}",
            err=True,
        )
    shown = str(target) if target.is_absolute() or len(target.parts) > 1 else f"./{target}"
    click.echo("next:")
    click.echo(f"  pip install -e {shown}")
    click.echo(f"  python -m pytest {shown}")
    click.echo(f'  use it in a recipe: [{kind}] name = "{name}"')
