"""What every command shares: option definitions, the error boundary, progress bars, output."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from wcond.defaults import Device, ProgressFn
from wcond.errors import WcondError
from wcond.hub import allow_downloads

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes: 0 fine, 1 a gate tripped, 2 unusable input or arguments.
EXIT_GATE = 1
EXIT_USAGE = 2

# Width of a table written to a pipe or file (a CI log) when the environment sets no COLUMNS: rich
# would take 80, too narrow for layer names beside the numbers, and a CI log is read wider.
PIPE_WIDTH = 160


class _Stdout(Console):
    """stdout: the terminal's width, else COLUMNS, else PIPE_WIDTH (decided at each print)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or os.environ.get("COLUMNS", "").isdigit():
            return size
        return ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


stdout = _Stdout(highlight=False, soft_wrap=False)
stderr = Console(stderr=True, highlight=False)


# Which format a file extension asks for, when -o is given without --format.
SUFFIX_FORMATS = {
    ".json": "json",
    ".md": "markdown",
    ".csv": "csv",
    ".txt": "table",
    ".html": "html",
    ".htm": "html",
    ".xml": "junit",
    ".parquet": "parquet",
}


def pick_format(
    names: Sequence[str], given: str | None, output: Path | None, fallback: str | None = None
) -> str:
    """--format, then -o's extension (when the command renders it), then ``fallback``, then the table."""
    from_suffix = SUFFIX_FORMATS.get(output.suffix.lower()) if output is not None else None
    return given or (from_suffix if from_suffix in names else None) or fallback or names[0]


# Options used by several commands, defined once; their defaults come from wcond.defaults.
DeviceOpt = Annotated[
    Device,
    typer.Option(
        "--device", help="Where the heavy work runs: auto picks CUDA, then MPS, then CPU."
    ),
]
LayersOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--layers", help="Only tensors whose key matches this glob (repeatable).", metavar="GLOB"
    ),
]
ExcludeOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--exclude", help="Skip tensors whose key matches this glob (repeatable).", metavar="GLOB"
    ),
]
TauCosOpt = Annotated[
    float, typer.Option("--tau-cos", help="Near-parallel when 1 - |cos| is below this.", min=0.0)
]
TauEucOpt = Annotated[
    float,
    typer.Option(
        "--tau-euc", help="...and the rescaled Euclidean distance is below this.", min=0.0
    ),
]
GroupsOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--groups",
        help="Conv groups of a layer, KEY=G (KEY may be a glob; repeatable).",
        metavar="KEY=G",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")]
# Read by handle_errors, which allows Hub downloads around the command that declares it.
DownloadOpt = Annotated[
    bool,
    typer.Option(
        "--download",
        help="A Hugging Face repo id not in the local cache: fetch its weight files (needs wcond\\[hub]).",
    ),
]
RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run the per-layer work as Ray tasks: on the cluster RAY_ADDRESS or --ray-address names, "
        "else on a local Ray instance. Needs pip install 'wcond\\[ray]'.",
    ),
]
RayAddressOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray-address",
        help="Ray cluster to join (implies --ray): ray://HOST:10001, HOST:6379 or auto.",
        metavar="ADDRESS",
        show_default=False,
    ),
]
CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint file (.pt .pth .bin .ckpt .safetensors), shard index, directory "
        "(sharded or DCP), or a Hugging Face repo id org/name\\[@rev] read from the local cache.",
        show_default=False,
    ),
]


# Library parameters whose flag is not simply --name-with-dashes.
_FLAG_SPELLING = {
    "force=True": "--force",
    "protect_ends=False": "--no-protect-ends",
    "download=True": "--download",
}


def in_flags(error: WcondError) -> str:
    """The error's message with each parameter it names (``layers=``) spelled as its flag."""
    text = str(error)
    for param in error.params:
        for lib, flag in _FLAG_SPELLING.items():
            if lib.startswith(param + "="):
                text = text.replace(lib, flag)
        text = re.sub(rf"\b{param}= ?", f"--{param.replace('_', '-')} ", text)
    return text


def handle_errors(func: F) -> F:
    """The one place library errors become a line on stderr and exit code 2 (WCOND_DEBUG=1 shows tracebacks)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with allow_downloads(bool(kwargs.get("download", False))):
                return func(*args, **kwargs)
        except WcondError as e:
            if os.environ.get("WCOND_DEBUG"):
                raise
            stderr.print(
                f"[bold red]error:[/] {escape(in_flags(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(EXIT_USAGE) from e
        except KeyboardInterrupt:
            stderr.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressFn]:
    """A transient progress bar on stderr (hidden when stderr is not a terminal); yields a callback."""
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[key]}", style="dim"),
        console=stderr,
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task(description, total=None, key="")

        def update(done: int, total: int, key: str) -> None:
            progress.update(task, completed=done, total=total, key=key[-40:])

        yield update


@contextmanager
def engine_for(ray: bool, address: str | None) -> Iterator[Any]:
    """The engine --ray/--ray-address ask for (None: this process); a Ray instance it started is stopped after."""
    if not ray and address is None:
        yield None
        return
    from wcond.engine import RayEngine

    engine = RayEngine(address)
    try:
        yield engine
    finally:
        engine.close()


def emit(text: str, output: Path | None) -> None:
    """Print to stdout, or write atomically to ``output`` and say so on stderr."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from wcond.save import write_text  # torch: only when writing

        write_text(output, text)
        stderr.print(f"wrote {output}")
