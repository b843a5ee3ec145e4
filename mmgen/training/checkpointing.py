"""Atomic, resumable checkpoints on top of `Accelerator.save_state`.

Layout: `RUN/checkpoints/step-00000250/` holds accelerate's state (model, optimizer, scheduler,
RNG), `ema.safetensors`, `trainer_state.json` (step, data position, counters),
`generators-rank{i}.safetensors` and `rank{i}_state.json` (each process's torch.Generator states
and data-stream position) and a `COMPLETE` marker. A
checkpoint is first written to a hidden temp dir and renamed into place by the main process
only after every process has finished writing, so a run killed at any moment never leaves a
directory that `find_latest` would pick up half-written (a rename within one file system is
atomic on POSIX). Nothing here unpickles: our own state is JSON and safetensors; accelerate
loads its files with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs and unmarked dirs are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def find_latest(run_dir: str | Path) -> Path | None:
    complete = list_complete(run_dir)
    return complete[-1] if complete else None


def save_checkpoint(
    accelerator,
    run_dir: str | Path,
    step: int,
    *,
    trainer_state: dict[str, Any],
    generators: dict[str, torch.Generator],
    rank_state: dict[str, Any] | None = None,
    ema=None,
    keep_last: int = 2,
) -> Path:
    """Write a checkpoint for `step` atomically and prune all but the newest `keep_last`."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank_file = tmp / f"generators-rank{accelerator.process_index}.safetensors"
    save_file({name: g.get_state() for name, g in generators.items()}, str(rank_file))
    (tmp / f"rank{accelerator.process_index}_state.json").write_text(json.dumps(rank_state or {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(tmp / "ema.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        (tmp / MARKER).write_text(str(step))
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in list_complete(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator, path: str | Path, *, generators: dict[str, torch.Generator], ema=None
) -> tuple[dict, dict]:
    """Restore what `save_checkpoint` wrote; returns (trainer state, this process's rank state)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    accelerator.load_state(str(path))
    if ema is not None:
        ema.load(path / "ema.safetensors")
    rank_file = path / f"generators-rank{accelerator.process_index}.safetensors"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} is missing: was the checkpoint written with another number of processes?")
    states = load_file(str(rank_file))
    for name, g in generators.items():
        if name not in states:
            raise KeyError(f"{rank_file} has no state for generator {name!r}")
        g.set_state(states[name])
    rank_state = json.loads((path / f"rank{accelerator.process_index}_state.json").read_text())
    return json.loads((path / "trainer_state.json").read_text()), rank_state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
