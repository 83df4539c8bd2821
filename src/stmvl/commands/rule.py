"""The one rule every ``stmvl`` command follows, and the logging set-up of a command process.

* A **user error** (bad file, bad value, missing path, unsupported input) prints ONE line
  ``stmvl <command>: error: <message>`` to stderr and the command exits 2. User errors are
  :class:`stmvl.errors.UserError` and its subclasses (ConfigError, MissingPathsError, CorruptWeightsError,
  ModelDirError, WeightLoadError, ...), argument errors of a :class:`CommandParser`, a media file that cannot be
  decoded (``MediaError``), files that do not exist or cannot be read, and input that is not UTF-8 text.
* Anything else is a **bug in stmvl**: its traceback is printed, then one line saying so and where to report it;
  the command exits 1.

``stmvl.cli.main`` applies the rule to every command; the command functions of this package apply it too (through
:func:`command`), so calling ``search_main([...])`` from Python gives the same exit codes as the shell.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from stmvl.errors import UserError

EXIT_OK, EXIT_BUG, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
REPORT_BUGS_TO = "the stmvl issue tracker"  # where the bug line sends people; the traceback above is what they need
# OS errors that are the user's (or their machine's) to fix, not stmvl's: a path that is not there, not readable,
# the wrong kind of thing, or a full disk
_USER_OS_ERRORS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOSPC,
                   errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS)

Main = Callable[[Sequence[str]], "int | None"]


class UsageError(UserError):
    """The command line itself is wrong (a missing or malformed argument)."""


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors follow the rule: one line naming the problem, exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def one_line(text: str) -> str:
    """A message folded onto one line (multi-line library messages stay readable, joined by '; ')."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, or None when ``exc`` is not one (then it is a bug in stmvl)."""
    if isinstance(exc, UserError):
        return one_line(str(exc))
    if isinstance(exc, UnicodeDecodeError):  # only ever raised here by reading the user's files as text
        return one_line(f"input is not UTF-8 text ({exc.reason} at byte {exc.start})")
    if isinstance(exc, OSError) and exc.errno in _USER_OS_ERRORS:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return one_line(f"{where}{exc.strerror or exc}")
    if isinstance(exc, FileNotFoundError):  # raised by hand, without an errno: the message names the file
        return one_line(str(exc))
    video = sys.modules.get("stmvl.data.video")  # not imported just to ask: a MediaError needs it loaded
    if video is not None and isinstance(exc, video.MediaError):
        return one_line(str(exc))
    return None


def run_command(name: str, main: Main, argv: Sequence[str]) -> int:
    """Run ``main(argv)`` under the rule; returns the exit code (0, 1 for a bug, 2 for a user error)."""
    configure_logging(name)
    try:
        return int(main(list(argv)) or 0)
    except SystemExit as exit_:  # --help, or a parser that exits by itself
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"stmvl {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the rule decides: user error (one line) or bug (traceback)
        message = user_error_message(exc)
        if message is not None:
            print(f"stmvl {name}: error: {message}", file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print(f"stmvl {name}: internal error: this is a bug in stmvl, not a problem with your input; please report "
              f"it to {REPORT_BUGS_TO} with the traceback above and the command line ({_versions()})", file=sys.stderr)
        return EXIT_BUG


def _versions() -> str:
    """What a bug report needs to reproduce: stmvl's, Python's and (when loaded) torch's versions."""
    import platform

    from stmvl import __version__

    torch = sys.modules.get("torch")
    parts = [f"stmvl {__version__}", f"Python {platform.python_version()}"]
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


def command(name: str) -> Callable[[Main], Callable[[Sequence[str] | None], int]]:
    """Decorator: the command function ``main(argv)`` runs under the rule (see :func:`run_command`)."""

    def wrap(main: Main) -> Callable[[Sequence[str] | None], int]:
        @functools.wraps(main)
        def wrapped(argv: Sequence[str] | None = None) -> int:
            return run_command(name, main, sys.argv[2:] if argv is None else argv)

        wrapped.command_name = name
        return wrapped

    return wrap


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` at each record (not the one of set-up time: tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


class _CommandFormatter(logging.Formatter):
    def __init__(self, name: str):
        super().__init__()
        self.prefix = f"stmvl {name}: "

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return self.prefix + level + record.getMessage()


def configure_logging(name: str) -> None:
    """Library messages (the ``stmvl`` loggers, INFO and up) go to stderr as ``stmvl <command>: message``.

    One handler per process, shared with ``stmvl.train.logging.console_logging`` (both mark it ``_stmvl_console``,
    so neither adds a second one and no line is printed twice); a later command in the same process only changes
    the prefix.
    """
    logger = logging.getLogger("stmvl")
    handler = next((h for h in logger.handlers if getattr(h, "_stmvl_console", False)), None)
    if handler is None:
        handler = _StderrHandler()
        handler._stmvl_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    handler.setFormatter(_CommandFormatter(name))
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
