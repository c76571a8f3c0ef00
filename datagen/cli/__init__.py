"""`datagen`: generate LLaVA-style visual instruction data from COCO.

One module per command group; each attaches its commands with `register(app)`. No command module
imports this one, so the package has no import circle. Every failure the user can act on ends the
same way, for every command: one line `error: <what>; <what to do>` on stderr and exit code 2
(`DatagenGroup.main`).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click; older typer uses click itself
    from typer._click import exceptions as cli_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as cli_errors

from datagen.cli import batch, cache, coco, generate, judge, merge, quality
from datagen.errors import VisinstructError
from datagen.escaping import echo, terminal_text
from datagen.urls import redact_text

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def echo_error(message: str) -> None:
    """The one way a command reports a failure: `error: ...` on one line of stderr.

    The message may quote ids, file names or text from the input (controls written out, so one line) and
    an endpoint URL (credentials redacted).
    """
    echo(f"error: {terminal_text(redact_text(message))}", err=True)


def _refuse_non_finite(command: Any) -> None:
    """Wrap every command's callback so a float flag given inf or nan is refused (they pass every range check
    and are not JSON); done once here for all commands, present and future."""
    for sub in getattr(command, "commands", {}).values():
        _refuse_non_finite(sub)
    callback = getattr(command, "callback", None)
    if callback is None or getattr(callback, "_finite_checked", False):
        return
    flags = {param.name: (param.opts[0] if getattr(param, "opts", None) else param.name) for param in command.params}

    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name, value in kwargs.items():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, float) and not math.isfinite(item):
                    raise VisinstructError(f"{flags.get(name, name)} {item} is not a finite number", "pass a finite number")
        return callback(*args, **kwargs)

    checked._finite_checked = True  # type: ignore[attr-defined]
    command.callback = checked


class DatagenGroup(TyperGroup):
    """The top-level command: usage errors, project errors and interrupts all become one line on stderr."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        _refuse_non_finite(self)
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Sequence[str] | None, prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except cli_errors.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() or "", nl=False)  # rich help prints itself and returns ""
            echo_error(f"no command given; pick one above, or run `{exc.ctx.command_path} --help`")
            return EXIT_USER_ERROR
        except cli_errors.UsageError as exc:
            where = f"`{exc.ctx.command_path} --help`" if exc.ctx is not None else "`datagen --help`"
            echo_error(f"{exc.format_message().rstrip('.')}; see {where}")
            return EXIT_USER_ERROR
        except cli_errors.ClickException as exc:
            echo_error(f"{exc.format_message().rstrip('.')}; see `datagen --help`")
            return EXIT_USER_ERROR
        except typer.Abort:
            echo_error("aborted; rerun the same command to resume (finished samples are kept)")
            return EXIT_INTERRUPTED
        except VisinstructError as exc:
            echo_error(str(exc))
            return EXIT_USER_ERROR
        # Non-standalone click returns the command's value, or an exit code for --help and ctx.exit.
        return result if isinstance(result, int) else 0

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Typer turns it into a silent exit 130 before main sees it: say what to do here.
            echo_error("interrupted; rerun the same command to resume (finished samples are kept)")
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    cls=DatagenGroup,
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
        echo(f"datagen (visinstruct) {package_version()}")
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
    # Idle OpenMP threads sleep instead of spinning: on a shared machine spinning burns the cores other work needs
    # (measured, bench/RESULTS.md issue 10). Read when torch loads, which is later (the local backend imports it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # transformers draws a tqdm bar while de-quantising GGUF weights; tqdm reads this at import time.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # transformers reads these when (and if) a command imports it: importing it here to flip the same switches
    # cost every command, `generate --backend openai` included, a second or more of start-up.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # already imported (an embedding caller): switch it directly
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def main() -> None:
    """Entry point: the app reports its own errors (one line, exit code 2); logs are redacted too."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting_filter)
    _quiet_libraries()
    app()


def redacting_filter(record: logging.LogRecord) -> bool:
    """A logging filter that strips credentials from every message before any handler writes it."""
    record.msg, record.args = redact_text(record.getMessage()), None
    return True
