"""The argument parser of the trainer's commands: a usage error is one line, as everywhere in the project."""
from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with `error: <what>; see `<prog> --help`` on one line and exit code 2 instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")
