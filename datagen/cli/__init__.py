"""`datagen`: generate LLaVA-style visual instruction data from COCO.

One module per command group; each attaches its commands with `register(app)`. No command module
imports this one, so the package has no import circle.
"""
from __future__ import annotations

import logging
import os
import sys
from importlib import metadata
from typing import Annotated

import typer

from datagen.cli import batch, cache, coco, generate, judge, merge, quality
from datagen.errors import VisinstructError
from datagen.escaping import terminal_text

app = typer.Typer(
    help="Turn COCO captions and boxes into LLaVA-format visual instruction data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
)
for group in (generate, coco, quality, cache, batch, merge, judge):
    group.register(app)


def package_version() -> str:
    """The installed distribution's version (package metadata, so it is the one `pip` sees)."""
    try:
        return metadata.version("visinstruct")
    except metadata.PackageNotFoundError:
        return "unknown (not installed; run `pip install -e .` in the checkout)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"datagen (visinstruct) {package_version()}")
        raise typer.Exit()


@app.callback()
def _top_level(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Options that come before the command."""


def _quiet_libraries() -> None:
    """Keep library chatter (loading bars, deprecation notes) off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers draws a tqdm bar while de-quantising GGUF weights; tqdm reads this at import time.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import transformers  # optional here; only its logging switches are touched

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def main() -> None:
    """Entry point: turns project errors into one line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        app()  # click handles usage errors itself (one message, exit code 2)
    except VisinstructError as exc:
        # The message may quote ids, file names or text from the input: one line, controls written out.
        typer.echo(f"error: {terminal_text(exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; rerun the same command to resume (finished samples are kept)", err=True)
        sys.exit(130)
