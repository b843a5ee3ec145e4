"""What the command-line tools share: one-line errors for what a user typed or pointed at.

A wrong setting, file, model path or prompt raises `UsageError` (or a subclass: `ConfigError`,
`ChatError`, `CheckpointError`) with a message that names it and says what was expected. `run_cli`
turns that into one line `error: ...` on stderr and exit status 2; `--debug` re-raises it to show the
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


class UsageError(ValueError):
    """Something the user typed or pointed at is wrong; the message names it and what was expected."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are `UsageError`s (one line via `run_cli`, not usage text and a second line)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a `UsageError` becomes `error: MESSAGE` on stderr and exit status 2.

    `main` may return an int exit status (anything else counts as 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        status = main(argv)
    except UsageError as err:
        if "--debug" in argv:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return status if isinstance(status, int) else 0


def text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized (None when it can): undecodable bytes from argv or stdin arrive as
    lone surrogates (Python's surrogateescape), which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        return f"not valid UTF-8 text ({what} at character {err.start}; check the terminal's or file's encoding)"
    return None
