"""What every command shares: the Typer app, the consoles, argument types and the error boundary."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import S3TError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact machine unlearning for fine-tuned transformers (S3T).")
# soft_wrap: one message stays one line when piped; highlight off: output is data, not decoration
console = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

RunDir = Annotated[Path, typer.Argument(help="The run folder.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def user_errors(command):
    """Turn s3t errors (user mistakes, bad data, missing runs) into one line on stderr and exit code 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except S3TError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
    return wrapper


def open_run(run_dir: Path):
    from ..system import S3T

    return S3T.open(run_dir)


def depths(system) -> str:
    return "served depth per shard " + ", ".join(f"{s.shard}: {s.served_depth}" for s in system.status().shards)
