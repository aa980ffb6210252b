"""The ``trackstream`` command. Each group of commands lives in its own module under
``ops/commands``; this file only assembles them and parses the global flags."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer import rich_utils

from ops.common import Options

# piped help (no terminal: rich assumes 80 columns) cut option names ("--max-pending-ag…"):
# lay it out wide enough that every name and value stays whole
if rich_utils.MAX_WIDTH is None and not sys.stdout.isatty():
    rich_utils.MAX_WIDTH = 200

app = typer.Typer(
    name="trackstream",
    help="A resilient GPS-tracker pipeline on Redis Streams consumer groups.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"trackstream {version('trackstream')}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None,
        typer.Option(
            help="Redis URL (redis://, rediss://); for a cluster, seed nodes may be listed "
            "comma-separated [env TRACKSTREAM_REDIS_URL]"
        ),
    ] = None,
    cluster: Annotated[
        bool | None,
        typer.Option(
            "--cluster/--no-cluster", help="Redis Cluster mode [env TRACKSTREAM_REDIS_CLUSTER]"
        ),
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="key prefix of this deployment [env TRACKSTREAM_PREFIX]")
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="print the version and exit"
        ),
    ] = False,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL (sqlite:/// or postgresql://) [env TRACKSTREAM_DATABASE_URL]"
        ),
    ] = None,
) -> None:
    values = {
        "redis_url": redis_url,
        "redis_cluster": cluster,
        "prefix": prefix,
        "database_url": database_url,
    }
    ctx.obj = Options({k: v for k, v in values.items() if v is not None})


# the operator's commands head ``--help`` in this order; the other modules follow by name
_FIRST = ("status", "replay", "consumers", "trim", "dlq")


def _register() -> None:
    """Register every module of ``ops/commands`` but the private ones (``_name``: what
    several command modules share)."""
    import importlib
    import pkgutil

    import ops.commands

    names = [i.name for i in pkgutil.iter_modules(ops.commands.__path__)]
    for name in sorted(names, key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n)):
        if not name.startswith("_"):
            importlib.import_module(f"ops.commands.{name}").register(app)
    _unwrap_help(app)


def _unwrap_help(group: typer.Typer) -> None:
    """Docstrings are wrapped at 100 columns; --help keeps the line breaks of every
    paragraph but the first, which cut sentences in the middle. Join each prose
    paragraph's lines (lists and indented blocks stay as they are)."""
    import inspect

    for info in group.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            info.help = "\n\n".join(
                p if _is_block(p) else " ".join(p.split("\n"))
                for p in inspect.cleandoc(doc).split("\n\n")
            )
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _unwrap_help(sub.typer_instance)


def _is_block(paragraph: str) -> bool:
    return any(line.startswith(("-", "*", " ", "|", "::")) for line in paragraph.split("\n"))


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
