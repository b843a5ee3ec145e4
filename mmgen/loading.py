"""Where a model comes from: a local export directory or a Hub id, checked before anything loads."""

from __future__ import annotations

import os
from pathlib import Path

from mmgen.cli import UsageError


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


def check_device(device: str | None) -> None:
    """UsageError naming `--device` when it is not a device name or names CUDA on a machine without it."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {device!r}: {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")


def load_export(name: str, device: str | None = None, flag: str = "--model"):
    """(model in eval mode on `device` (default: CUDA when available), processor) of an mmgen export, or a
    one-line UsageError naming `name` and what is wrong (missing directory, not an export, damaged weights)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    import mmgen  # noqa: F401  registers the Auto classes

    check_model_source(name, flag)
    check_device(device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModel.from_pretrained(name).eval().to(device)
        processor = AutoProcessor.from_pretrained(name)
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise UsageError(f"{flag} {name}: cannot load the model from it ({reason})") from err
    return model, processor
