"""The --config option and how its values meet the command line: flags beat the file, the file beats defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from wcond.cli.common import stderr
from wcond.config import Config, load_config, parse_groups
from wcond.text import one_line

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        help="Settings file: a pyproject.toml with \\[tool.wcond], or a wcond.toml. "
        "Default: the first found from the current directory upward.",
        metavar="FILE",
    ),
]


def read_config(path: Path | None) -> Config:
    """The named or discovered config, announced on stderr so a CI log shows which policy applied."""
    config = load_config(path)
    if config.path is not None:
        stderr.print(
            f"config: {one_line(config.path)}", markup=False, highlight=False, soft_wrap=True
        )
    return config


def with_config(ctx: typer.Context, config: Config, **values: Any) -> dict[str, Any]:
    """Each option's value: as given on the command line, else the config file's, else the option's default.

    The result is ready for :func:`wcond.inspect`: unset lists become (), ``--groups KEY=G`` a dict.
    """

    def on_command_line(name: str) -> bool:
        # By name: typer may bring its own copy of click, whose ParameterSource is another enum class.
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    out = {
        k: v if on_command_line(k) or k not in config.values else config.values[k]
        for k, v in values.items()
    }
    for key in ("layers", "exclude", "fail_if"):
        if key in out:
            out[key] = tuple(out[key] or ())
    if "groups" in out and not isinstance(out["groups"], dict):
        out["groups"] = parse_groups(out["groups"] or ())
    return out
