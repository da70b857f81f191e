"""What the command line does before any work starts: usage errors as one line, and Ctrl-C at any moment.

Usage errors: argparse's own messages (a missing argument, a bad value, an unknown flag) become one line,
``error: <what>; see `qcompile COMMAND --help``, exit status 2, with ``did you mean --policy?`` when an
unknown flag or command is close to a known one (difflib's ratio >= 0.6). Python 3.11's argparse has no
suggestions of its own.

Ctrl-C: the first SIGINT marks the run as interrupted, silences warnings (whatever torch says while it
unwinds is noise) and raises KeyboardInterrupt; the command line then prints ``interrupted`` and exits
130. Some libraries turn a KeyboardInterrupt raised inside them into another error (or a warning, during
an import); ``interrupted()`` lets the caller report those as the interruption they are. A second Ctrl-C
exits at once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
import warnings
from types import FrameType
from typing import NoReturn

INTERRUPTED = 130
_state = {"interrupted": False}


class UsageError(Exception):
    """An argparse error, raised instead of printing the usage and exiting."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class InputError(Exception):
    """A user error found before torch is imported (e.g. a model file that does not exist)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (UsageError) so that main prints them as one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def positive_int(text: str) -> int:
    """An argparse type: a whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
    return value


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_arguments(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """One line for arguments ``parser`` does not take, with the closest known flag for the first one."""
    flags = [e for e in extras if e.startswith("-")]
    if not flags:
        return f"error: unexpected argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}; " + _see(parser)
    name = flags[0].split("=", 1)[0]
    return f"error: unknown option {name}{_suggest(name, _options(parser))}; " + _see(parser)


def usage_line(error: UsageError) -> str:
    """``error: <argparse's message>[; did you mean X?]; see `PROG --help```."""
    message = str(error)
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    hint = ""
    if choice:
        hint = _suggest(choice.group(1), re.findall(r"'?([\w-]+)'?", choice.group(2)))
    return f"error: {message}{hint}; " + _see(error.parser)


def _see(parser: argparse.ArgumentParser) -> str:
    return f"see `{parser.prog} --help`"


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _state["interrupted"]:  # the second Ctrl-C: leave now
        os.write(2, b"\nerror: interrupted\n")
        os._exit(INTERRUPTED)
    _state["interrupted"] = True
    warnings.simplefilter("ignore")
    raise KeyboardInterrupt


def catch_interrupts() -> None:
    """Install the SIGINT handler (main thread only; elsewhere Python's default stays)."""
    try:
        signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread
        pass


def interrupted() -> bool:
    return _state["interrupted"]


def report_interrupt() -> int:
    """Print the one line for an interruption and return its exit status."""
    sys.stdout.flush()
    print(("\n" if sys.stderr.isatty() else "") + "error: interrupted", file=sys.stderr)  # after a progress bar
    return INTERRUPTED
