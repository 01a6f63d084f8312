"""What every command shares: option definitions, the error boundary, progress bars, output."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from wcond.errors import WcondError
from wcond.hub import allow_downloads
from wcond.save import write_text

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes: 0 fine, 1 a gate tripped, 2 unusable input or arguments.
EXIT_GATE = 1
EXIT_USAGE = 2

stdout = Console(highlight=False, soft_wrap=False)
stderr = Console(stderr=True, highlight=False)


class ReportFormat(str, Enum):
    """Output of the commands that rewrite a checkpoint (init-cs, shrink): a table, or JSON for scripts."""

    table = "table"
    json = "json"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


# Options used by several commands, defined once.
DeviceOpt = Annotated[
    DeviceChoice,
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
CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint file (.pt .pth .bin .ckpt .safetensors), shard index, directory "
        "(sharded or DCP), or a Hugging Face repo id org/name\\[@rev] read from the local cache.",
        show_default=False,
    ),
]


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
            stderr.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from e
        except KeyboardInterrupt:
            stderr.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int, str], None]]:
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


def emit(text: str, output: Path | None) -> None:
    """Print to stdout, or write atomically to ``output`` and say so on stderr."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text(output, text)
        stderr.print(f"wrote {output}")
