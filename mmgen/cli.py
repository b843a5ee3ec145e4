"""What the command-line tools share: one-line errors for what a user typed or pointed at.

A wrong setting, file, model path or prompt raises `UsageError` (or a subclass: `ConfigError`,
`ChatError`, `CheckpointError`) with a message that names it and says what was expected. `run_cli`
turns that into one line `error: ...` on stderr and exit status 2; `--debug` re-raises it to show the
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


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


def looks_local(name: str) -> bool:
    """Whether a `--model` argument means a directory rather than a Hub id ("org/name"): it exists, starts
    with '.', '/' or '~', has a path separator beyond one org/name pair, or the Hub is offline (and the id
    is not in the local Hub cache)."""
    from huggingface_hub import is_offline_mode

    path = Path(os.path.expanduser(name))
    if path.exists() or name.startswith((".", "/", "~")) or name.replace(os.sep, "/").count("/") > 1:
        return True
    return is_offline_mode() and not _in_hub_cache(name)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def check_model_source(name: str, flag: str = "--model") -> None:
    """UsageError naming `name` when it looks like a local path (`looks_local`) and is not a directory."""
    path = Path(os.path.expanduser(name))
    if not name.strip():
        raise UsageError(f"{flag}: empty model path")
    if path.is_file():
        raise UsageError(f"{flag} {name}: a file, not a model directory")
    if looks_local(name) and not path.exists():
        raise UsageError(f"no such model directory: {name}")


def load_export(name: str, device: str = "cpu", flag: str = "--model"):
    """(model in eval mode on `device`, processor) of an mmgen export, or a UsageError naming `name` and what
    is wrong (missing directory, not an export, damaged weights)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    import mmgen  # noqa: F401  registers the Auto classes

    check_model_source(name, flag)
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {device!r}: {err}") from None
    try:
        model = AutoModel.from_pretrained(name).eval().to(device)
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # not an mmgen export, or damaged
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise UsageError(f"{flag} {name}: cannot load an mmgen model from it ({reason})") from None
    return model, processor
