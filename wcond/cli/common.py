"""What every command shares: option definitions, the error boundary, progress bars, output."""

from __future__ import annotations

import errno
import functools
import gc
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar, get_args

import typer
from rich.console import Console, ConsoleDimensions
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from wcond.checkpoint.hub import allow_downloads
from wcond.defaults import Device, ProgressFn, RewriteFormat
from wcond.errors import OutputError, UsageError, WcondError, show_path
from wcond.text import markup, one_line

F = TypeVar("F", bound=Callable[..., Any])

# typer's own exceptions pass through the error boundary. Its usage errors derive from click's
# ClickException, which since typer 0.26 is a vendored copy (and click itself may be absent), so
# the class is taken from typer rather than imported from click.
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_TYPER_EXCEPTIONS: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort, _CLICK_EXCEPTION)

# Exit codes: 0 fine, 1 a gate tripped, 2 unusable input or arguments; 141 (what a shell reports for
# a process killed by SIGPIPE) when the reader of stdout went away, as `| head` does.
EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_PIPE = 141


class _ReaderGone(OutputError):
    """stdout's reader closed the pipe: not an error to report, since nobody reads any more."""


class _GuardedStdout:
    """``sys.stdout`` as it is at each call (test runners swap it); a failed write is an OutputError.

    A full disk or a closed pipe on stdout becomes one line on stderr and exit 2, and stdout is
    pointed at /dev/null so that Python's final flush does not print a second, raw error.
    """

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except OSError as e:
            raise _stdout_failed(e) from e

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except OSError as e:
            raise _stdout_failed(e) from e

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stdout, name)


def _stdout_failed(e: OSError) -> OutputError:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test runner's buffer): nothing to silence
        pass
    if e.errno == errno.EPIPE:
        return _ReaderGone("cannot write to standard output: the reader closed the pipe")
    return OutputError(f"cannot write to standard output: {e.strerror or e}")


STDOUT = _GuardedStdout()

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


stdout = _Stdout(file=STDOUT, highlight=False, soft_wrap=False)  # type: ignore[arg-type]
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
    """--format; else -o's extension, refused when the command renders no format for it; else
    (no -o) ``fallback``, then the table."""
    if given is not None:
        return given  # named outright: any file name (a pipe, /dev/stdout, report.log)
    if output is None:
        return fallback or names[0]
    return format_from_suffix(names, output)


def format_from_suffix(names: Sequence[str], output: Path) -> str:
    """The format -o's extension names among ``names``; a UsageError listing the extensions otherwise."""
    fmt = SUFFIX_FORMATS.get(output.suffix.lower(), "")
    if fmt not in names:
        known = " ".join(s for s, f in SUFFIX_FORMATS.items() if f in names)
        raise UsageError(
            f"{output}: no report format for {output.suffix or '(no extension)'!r} here; "
            f"use {known} (or --format for another name)"
        )
    return fmt


def finite(value: float | None) -> float | None:
    """Option callback: a number option must be finite (the ranges let inf through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value}: expected a finite number")
    return value


# Options used by several commands, defined once; their defaults come from wcond.defaults.
DeviceOpt = Annotated[
    Device,
    typer.Option(
        "--device",
        help="Where the heavy work runs: auto, cpu, cuda or mps; auto picks CUDA, then MPS, then CPU.",
        metavar="DEVICE",
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
    float,
    typer.Option(
        "--tau-cos",
        help="Near-parallel when 1 - |cos| is below this (>= 0).",
        min=0.0,
        callback=finite,
        metavar="FLOAT",
    ),
]
TauEucOpt = Annotated[
    float,
    typer.Option(
        "--tau-euc",
        help="...and the rescaled Euclidean distance is below this (>= 0).",
        min=0.0,
        metavar="FLOAT",
        callback=finite,
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
OutputOpt = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", help="Write to this file instead of stdout (atomically)."),
]
RewriteFormatOpt = Annotated[
    RewriteFormat,
    typer.Option(
        "--format",
        "-f",
        help="Report format on stdout: " + ", ".join(get_args(RewriteFormat)) + ".",
        metavar="FORMAT",
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


def _gates_epilog() -> str:
    from wcond.gates import OPERATORS
    from wcond.report import METRIC_LABELS, NUMERIC_FIELDS

    metrics = ", ".join(
        f"{m} ({METRIC_LABELS[m]})" if m in METRIC_LABELS else m for m in NUMERIC_FIELDS
    )
    return (
        f"Gates, --fail-if METRIC OP NUMBER: METRIC is one of {metrics} (the table's short "
        f"labels, in parentheses, work too); OP one of {' '.join(OPERATORS)}."
    )


FAIL_IF_HELP = "Gate: exit 1 when any layer satisfies METRIC OP NUMBER, e.g. 'acv>0.5' (repeatable; metrics below)."
GATES_EPILOG = _gates_epilog()

# What a checkpoint argument may be, in every command's help.
CHECKPOINT_HELP = (
    "Checkpoint file (.pt .pth .bin .ckpt .safetensors), shard index, directory (sharded or DCP), "
    "or a Hugging Face repo id org/name\\[@rev] read from the local cache."
)
CheckpointArg = Annotated[
    Path, typer.Argument(help=CHECKPOINT_HELP, show_default=False, metavar="CHECKPOINT")
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


class Terminated(BaseException):
    """SIGTERM (what CI sends on cancel), raised like Ctrl-C so that every ``finally`` runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
    raise Terminated


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` (the main thread only can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off for a block (the import of torch, which creates about 165,000
    objects and would otherwise trigger collection after collection over them: 0.2 s of a 1.5 s
    import on this project's machines), back to its previous state after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_gates(fail_if: Sequence[str]) -> None:
    """Parse the --fail-if expressions as inspect will, so that a typo is reported before torch loads."""
    from wcond.gates import Gate
    from wcond.report import resolve_metric

    for expr in fail_if:
        Gate.parse(expr, resolve_metric)


def load_torch() -> None:
    """Import torch for a command's work: after its usage checks, so that a usage error never waits for it.

    The cycle collector is paused during the import (its thousands of objects would trigger a
    dozen collections) and the result frozen: they live as long as the process, so no later
    collection need visit them.
    """
    if "torch" not in sys.modules:
        with collector_paused():
            import torch  # noqa: F401
        gc.freeze()


def handle_errors(func: F) -> F:
    """The one place errors become a line on stderr: exit 2, or 130 for Ctrl-C (WCOND_DEBUG=1 shows tracebacks).

    Library errors, an output that cannot be written (full disk, closed stdout) and SIGTERM all
    end the same way; the atomic writers' cleanup has run by then, so no partial file is left.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_raises(), allow_downloads(bool(kwargs.get("download", False))):
                return func(*args, **kwargs)
        except _ReaderGone:
            raise typer.Exit(EXIT_PIPE) from None  # quietly, as `cat` or `grep` would end
        except (WcondError, OSError) as e:
            if os.environ.get("WCOND_DEBUG"):
                raise
            _error(_describe(e))
            raise typer.Exit(EXIT_USAGE) from e
        except KeyboardInterrupt:
            _error("interrupted; nothing was written", prefix="")
            raise typer.Exit(130) from None
        except Terminated:
            _error("terminated (SIGTERM); nothing was written", prefix="")
            raise typer.Exit(EXIT_USAGE) from None
        except _TYPER_EXCEPTIONS:
            raise
        except BaseException as e:
            # A bug in wcond met on some input, or what a dependency raises outside Exception
            # (torch.distributed's CheckpointException, a sys.exit()): exit 1 means a gate
            # tripped and nothing else, so each ends as one line and exit 2, never a traceback.
            if os.environ.get("WCOND_DEBUG"):
                raise
            _error(
                f"internal error: {_first_line(e)} (a bug in wcond; rerun with "
                "WCOND_DEBUG=1 for the traceback and report it)"
                if isinstance(e, Exception)
                else f"{_first_line(e)} raised inside a library wcond uses; nothing was written "
                "(rerun with WCOND_DEBUG=1 for the traceback)"
            )
            raise typer.Exit(EXIT_USAGE) from e

    return wrapper  # type: ignore[return-value]


def _first_line(e: BaseException) -> str:
    """An exception as one escaped line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {show_path(lines[0][:300])}" if lines else type(e).__name__


def _describe(e: WcondError | OSError) -> str:
    """A library error's message in flags; for a bare OSError, the file and the system's reason."""
    if isinstance(e, WcondError):
        return in_flags(e)
    where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
    return where + (e.strerror or str(e))


def _error(message: str, prefix: str = "[bold red]error:[/] ") -> None:
    """One line on stderr: the message's control characters escaped, its markup shown literally."""
    stderr.print(prefix + markup(message), highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressFn]:
    """A transient progress bar on stderr (hidden when stderr is not a terminal); yields a callback."""
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[key]}", style="dim", markup=False),
        console=stderr,
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task(description, total=None, key="")

        def update(done: int, total: int, key: str) -> None:
            # The key comes from the checkpoint: shown escaped, never as markup.
            progress.update(task, completed=done, total=total, key=one_line(key)[-40:])

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
        STDOUT.write(text)
        STDOUT.flush()
    else:
        from wcond.output import write_text

        write_text(output, text)
        say_written(output)


def show(kind: str, result: Any, fmt: str, output: Path | None, **options: Any) -> None:
    """``result`` in format ``fmt``: the table in color on a terminal, else text to stdout or ``output``."""
    from wcond.render import RENDERERS, render

    if fmt == "table" and output is None:
        RENDERERS[kind].table(result, stdout)
    else:
        emit(render(kind, result, fmt, **options), output)


def say_gates(reports: Sequence[Any], shown_on_terminal: bool) -> None:
    """One stderr line per gate violation (gate, checkpoint, layer, value), then their count.

    Whatever the format or destination of the report, a job log then says why it failed; only
    a table printed on a terminal, which shows its FAIL lines itself, goes without them.
    """
    from wcond.render.text import fmt_number

    if shown_on_terminal and STDOUT.isatty():
        return
    count, tripped = 0, 0
    for report in reports:
        bad = [(g.expr, v) for g in report.gates if not g.passed for v in g.violations]
        tripped += bool(bad)
        count += len(bad)
        for expr, v in bad:
            stderr.print(
                f"FAIL {markup(expr)}: {markup(report.checkpoint)} {markup(v.layer)} = "
                f"{fmt_number(v.value)}",
                highlight=False,
                soft_wrap=True,
            )
    if count:
        checkpoints = f" in {tripped} of {len(reports)} checkpoints" if len(reports) > 1 else ""
        stderr.print(
            f"{count} gate violation{'s' if count != 1 else ''}{checkpoints}: exit 1",
            highlight=False,
        )


def say_written(path: object) -> None:
    """The `wrote PATH` line on stderr, the path escaped (one line, markup shown literally)."""
    stderr.print(f"wrote {markup(path)}", highlight=False, soft_wrap=True)
