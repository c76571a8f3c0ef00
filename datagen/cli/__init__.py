"""`datagen`: generate LLaVA-style visual instruction data from COCO.

One module per command group; each attaches its commands with `register(app)`. No command module
imports this one, so the package has no import circle.
"""
from __future__ import annotations

import logging
import os
import sys

import typer

from datagen.cli import batch, cache, coco, generate, judge, merge, quality
from datagen.errors import VisinstructError
from datagen.escaping import terminal_text

app = typer.Typer(
    help="Turn COCO captions and boxes into LLaVA-format visual instruction data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for group in (generate, coco, quality, cache, batch, merge, judge):
    group.register(app)


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
