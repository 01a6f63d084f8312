"""Several outputs from one analysis (`-o` repeated), and the GitHub Actions job summary and annotations.

inspect and diff analyse once, then hand the result to every output asked for: each file in the
format its extension names, written atomically, and the table on stdout unless ``--quiet``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from wcond.cli.common import (
    STDOUT,
    emit,
    format_from_suffix,
    pick_format,
    say_written,
    show,
    stderr,
)
from wcond.errors import OutputError, UsageError

__all__ = [
    "GithubOpt",
    "OutputPlan",
    "OutputsOpt",
    "QuietOpt",
    "github_wanted",
    "plan_outputs",
    "to_github",
    "write_outputs",
]

OutputsOpt = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--output",
        "-o",
        help="Write to FILE (atomically), its format from its extension (.html .xml .md .json .csv "
        ".txt .parquet; diff: .md .json .txt), or from --format for any other name. Repeatable: "
        "one analysis, every file; the table still goes to stdout.",
        metavar="FILE",
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Nothing on stdout (with -o: no table beside the files)."),
]
GithubOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--github/--no-github",
        help="GitHub Actions: append the Markdown summary to $GITHUB_STEP_SUMMARY and annotate each "
        "tripped gate (default: on when GITHUB_ACTIONS=true).",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class OutputPlan:
    """Where a result goes: files and their formats, and the format shown on stdout (None: nothing)."""

    files: list[tuple[Path, str]]
    stdout: str | None

    @property
    def formats(self) -> set[str]:
        return {fmt for _, fmt in self.files} | ({self.stdout} if self.stdout else set())


def plan_outputs(
    names: Sequence[str],
    given: str | None,
    outputs: Sequence[Path] | None,
    fallback: str | None = None,
    quiet: bool = False,
) -> OutputPlan:
    """Each -o with its format, checked before any work: one -o from --format, else from its
    extension; several, each from its extension. An extension the command renders no format for
    is refused, never written as a table. ``fallback`` (the config's format) and then the table
    are for stdout without -o. The table goes to stdout beside the files, and without -o the
    chosen format does, unless ``quiet``."""
    outputs = list(outputs or [])
    if not outputs:
        fmt = pick_format(names, given, None, fallback)
        if fmt == "parquet":
            raise UsageError("--format parquet writes a binary file: give -o FILE.parquet")
        return OutputPlan([], None if quiet else fmt)
    seen: dict[Path, Path] = {}
    for out in outputs:
        key = Path(os.path.abspath(out))
        if key in seen:
            raise UsageError(f"{out}: given twice to -o")
        seen[key] = out
    if len(outputs) == 1:
        files = [(outputs[0], pick_format(names, given, outputs[0], fallback))]
    else:
        if given is not None:
            raise UsageError(
                "--format goes with one -o; with several, each file's format comes from its extension"
            )
        files = [(out, format_from_suffix(names, out)) for out in outputs]
    return OutputPlan(files, None if quiet else "table")


def write_outputs(
    kind: str,
    result: Any,
    plan: OutputPlan,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """``result`` on stdout and in every file of ``plan``, each rendered once from the same result.

    ``options`` per format go to its renderer (html: the heatmaps' cosines).
    """
    options = options or {}
    if plan.stdout is not None:
        show(kind, result, plan.stdout, None, **options.get(plan.stdout, {}))
    for path, fmt in plan.files:
        if fmt == "parquet":
            from wcond.frames import write_parquet

            write_parquet(result.to_pandas(), path)
            say_written(path)
        else:
            from wcond.render import render

            emit(render(kind, result, fmt, **options.get(fmt, {})), path)


def github_wanted(flag: bool | None) -> bool:
    """--github/--no-github, else on inside GitHub Actions (GITHUB_ACTIONS=true)."""
    return flag if flag is not None else os.environ.get("GITHUB_ACTIONS") == "true"


def to_github(kind: str, result: Any, reports: Sequence[Any], stdout_taken: bool) -> None:
    """Append the Markdown summary to $GITHUB_STEP_SUMMARY, and print the annotations.

    Workflow commands go to stdout, as GitHub documents; to stderr (which the runner reads for
    them too) when stdout carries a report in another format, which they would corrupt.
    """
    from wcond.render import render
    from wcond.render.github import workflow_commands

    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        text = render(kind, result, "markdown")
        try:
            # Appended, not replaced: the file holds the job's other steps' summaries too.
            with open(summary, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            raise OutputError(
                f"{summary}: cannot append the job summary ({e.strerror or e})"
            ) from e
    else:
        stderr.print("GITHUB_STEP_SUMMARY is not set: no job summary written", highlight=False)
    lines = workflow_commands(reports)
    if not lines:
        return
    if stdout_taken:
        sys.stderr.write(lines)
        sys.stderr.flush()
    else:
        STDOUT.write(lines)
        STDOUT.flush()
