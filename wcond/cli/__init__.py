"""The `wcond` command line: parse, call one library function, render.

Each command lives in its own module; this one builds the app and registers them.
"""

from __future__ import annotations

import gc
import inspect
from typing import Annotated

import typer

from wcond import __version__

app = typer.Typer(
    name="wcond",
    help="Weight analysis and conditioning for PyTorch checkpoints: ACV, Convolutional Similarity, Norm Loss, RaRe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wcond {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Weight analysis and conditioning for PyTorch checkpoints."""


from wcond.cli import (  # noqa: E402  (each module registers its command on app)
    diff_cmd,  # noqa: E402,F401
    init_cs_cmd,  # noqa: E402,F401
    inspect_cmd,  # noqa: E402,F401  (registers its command on app)
    plot_cmd,  # noqa: E402,F401
    shrink_cmd,  # noqa: E402,F401
)


def _reflow(doc: str) -> str:
    """A docstring as help text: its paragraphs kept, the line breaks inside them dropped.

    typer's rich help keeps a docstring's line breaks, and the terminal then wraps each line
    again, leaving fragments at any width but the source's.
    """
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


for _info in app.registered_commands:
    if _info.help is None and _info.callback is not None and _info.callback.__doc__:
        _info.help = _reflow(_info.callback.__doc__)


def main() -> None:
    """The `wcond` console script: the app, then an exit that skips collecting what is left.

    Everything the command wrote is flushed by then. Freezing the surviving objects spares the
    interpreter's final cycle collections over torch's objects (about 0.3 s of every exit);
    reference counting still finalizes files and the atexit handlers still run.
    """
    try:
        app(prog_name="wcond")
    finally:
        gc.freeze()


__all__ = ["app", "main"]
