"""Atomic, resumable checkpoints on top of `Accelerator.save_state`.

Layout: `RUN/checkpoints/step-00000250/` holds accelerate's state (model, optimizer, scheduler,
RNG), `ema.safetensors`, `trainer_state.json` (step, data position, counters),
`generators-rank{i}.safetensors` and `rank{i}_state.json` (each process's torch.Generator states
and data-stream position), `manifest.json` (relative path -> size and SHA-256 of every other file)
and a `COMPLETE` marker. A checkpoint is first written to a hidden temp dir and renamed into place by
the main process only after every process has finished writing, so a run killed at any moment never
leaves a directory that `find_latest` would pick up half-written (a rename within one file system is
atomic on POSIX). The manifest catches what the rename cannot: a file damaged afterwards (a full disk,
a copy cut short). `resume_latest` checks it and falls back to the newest intact checkpoint;
checkpoints written before manifests existed load unverified (and a failure to load one also falls
back). Nothing here unpickles: our own state is JSON and safetensors; accelerate loads its files with
`weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmgen.cli import UsageError

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"
MANIFEST = "manifest.json"


class CheckpointError(UsageError):
    """No checkpoint of a run can be resumed from; the message names the run directory or checkpoint."""


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
        write_manifest(tmp)  # last but the marker: it covers every file of every process
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


def write_manifest(path: Path) -> None:
    """`path/manifest.json`: {relative path: {"size", "sha256"}} of every file below `path`."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER))
    entries = {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (path / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify_checkpoint(path: str | Path) -> str | None:
    """What is wrong with the checkpoint at `path` by its manifest (None: intact, or no manifest to check)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    for name, want in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, the manifest says {want['size']}"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def resume_latest(
    accelerator,
    run_dir: str | Path,
    *,
    generators: dict[str, torch.Generator],
    ema=None,
    warn: Callable[[str], None] | None = None,
) -> tuple[Path, dict, dict] | None:
    """Load the newest intact complete checkpoint of `run_dir`: (its path, trainer state, rank state).

    A checkpoint whose files do not match its manifest is skipped with a warning naming it and what is
    wrong; so is one without a manifest that fails to load. None when the run has no checkpoint;
    CheckpointError when it has some and none can be loaded. A checkpoint that matches its manifest
    and still fails to load (another model or number of processes) is an error: an older one would fail
    the same way. Every process loads the checkpoint the main process verified."""
    candidates = list_complete(run_dir)[::-1]
    if not candidates:
        return None
    return _resume(accelerator, candidates, Path(run_dir) / "checkpoints", generators, ema, warn)


def resume_from(accelerator, path: str | Path, *, generators: dict[str, torch.Generator], ema=None,
                warn: Callable[[str], None] | None = None) -> tuple[Path, dict, dict]:
    """`resume_latest` for the one checkpoint `path` (run.resume=PATH): no fallback."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"run.resume={path}: not a complete checkpoint (no {MARKER} marker there)")
    return _resume(accelerator, [path], path, generators, ema, warn)


def _resume(accelerator, candidates: list[Path], where: Path, generators, ema, warn):
    from accelerate.utils import broadcast_object_list

    if not accelerator.is_main_process:  # one warning per run, not one per process
        warn = lambda message: None
    warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
    problems = [verify_checkpoint(p) if accelerator.is_main_process else None for p in candidates]
    problems = broadcast_object_list(problems)  # one process hashes; all agree on the choice
    for i, (path, problem) in enumerate(zip(candidates, problems)):
        then = "; trying the previous one" if i + 1 < len(candidates) else ""
        if problem is not None:
            warn(f"warning: checkpoint {path} is damaged: {problem}{then}")
            continue
        try:
            trainer_state, rank_state = load_checkpoint(accelerator, path, generators=generators, ema=ema)
            failure = None
        except Exception as err:  # noqa: BLE001  damage shows as an error of whichever loader reads it
            failure = f"{type(err).__name__}: {err}".splitlines()[0]
        failed = accelerator.reduce(torch.tensor(float(failure is not None), device=accelerator.device), "max")
        if not bool(failed):
            return path, trainer_state, rank_state
        failure = failure or "it failed to load in another process"
        if (path / MANIFEST).is_file():
            raise CheckpointError(f"cannot resume from checkpoint {path}: its files are intact but do not load "
                                  f"into this run ({failure})")
        warn(f"warning: checkpoint {path} (written without a manifest) does not load: {failure}{then}")
    raise CheckpointError(f"no intact checkpoint to resume from in {where} (tried {len(candidates)}); "
                          "set run.resume=none to start over")


def drop_steps_after(path: str | Path, step: int) -> None:
    """Rewrite the JSON-lines log `path` atomically without the lines of steps after `step` (a resumed run
    logs them again) and without a line cut short by a kill. Lines without a step are kept."""
    path = Path(path)
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += bool(line.strip())
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
