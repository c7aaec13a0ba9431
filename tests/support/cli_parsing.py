"""Whether a ``segq ...`` command line that a file shows (a deploy
manifest, a docs page) parses as the command line's own click parser reads
it, without running it."""

from __future__ import annotations

import click

from segq.cli.main import main as segq_cli


def segq_command_error(args: list[str], *, placeholders: bool = False) -> str | None:
    """Why ``segq *args`` would not parse as the CLI's (None: it parses).
    ``placeholders``: a value left to the reader (``"$SHA256"``, ``<id>``)
    is not judged, as docs show them."""
    command: click.Command = segq_cli
    name = "segq"
    rest = list(args)
    while isinstance(command, click.Group):
        if not rest:
            return f"{name}: no subcommand"
        found = command.get_command(click.Context(command), rest[0])
        if found is None:
            return f"{name} has no command {rest[0]!r}"
        name, command, rest = f"{name} {rest[0]}", found, rest[1:]
    try:
        command.make_context(name, list(rest))  # click consumes the list it is given
    except click.BadParameter as exc:
        if placeholders:
            if exc.param is None:  # raised by an option's callback
                given = [word for word in rest if word.startswith(("$", "<"))]
            else:
                given = [rest[i + 1] for i, word in enumerate(rest[:-1]) if word in exc.param.opts]
            if given and all(value.startswith(("$", "<")) for value in given):
                return None
        return f"{name} {' '.join(rest)}: {exc.format_message()}"
    except click.ClickException as exc:
        return f"{name} {' '.join(rest)}: {exc.format_message()}"
    return None
