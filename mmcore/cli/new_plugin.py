"""``mmcore new-plugin``."""

from __future__ import annotations

from pathlib import Path

import click

from mmcore.commands.new_plugin import KINDS, SOURCES, ScaffoldError, already_registered, plugin_names, write_plugin


class _OneLineError(click.ClickException):
    """Print just the message (no "Error:" prefix or usage), like the other mmcore commands."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None):
        click.echo(self.format_message(), err=True)


@click.command("new-plugin")
@click.argument("name")
@click.option("--kind", type=click.Choice(KINDS), help="What the plugin provides (needed with --from plain, the default).")
@click.option(
    "--from",
    "template",
    type=click.Choice(SOURCES),
    default="plain",
    show_default=True,
    help="What the package wraps: a model of its own (plain) or a library's model.",
)
@click.option(
    "--package",
    help="Distribution name, also the entry point and (with _ for -) the import name "
    "(default: mmcore-<kind>-<family of NAME>, e.g. mmcore-vision-mobilenet).",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    help="Folder to create (default: plugins/<package without mmcore-> in the current directory).",
)
def new_plugin_command(name, kind, template, package, directory):
    """Write a new plugin package providing the encoder NAME, ready to pip install and test."""
    try:
        names = plugin_names(name, kind, template=template, package=package)
        target = write_plugin(name, names.kind, directory, template=template, package=package)
    except ScaffoldError as exc:
        raise _OneLineError(str(exc), exc.exit_code) from None
    kind = names.kind
    click.echo(f"wrote {target}/ ({names.dist}, module {names.module}, {kind} encoder {name!r})")
    owner = already_registered(names)
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
