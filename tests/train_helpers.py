"""Shared pieces of the training tests: a tiny random VAE, shared shards, and launching train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny_train.yaml"
TRAIN = ROOT / "training" / "train.py"
# training/train.py with stage 1 shrunk to seconds (tests/data/train_with_tiny_stage1.py)
TRAIN_TINY_STAGE1 = ROOT / "tests" / "data" / "train_with_tiny_stage1.py"
# A stage-1 run of seconds: fields of mmgen.training.vae_stage.VAETrainConfig (its defaults take minutes).
TINY_STAGE1 = {"steps": 3, "batch_size": 4, "base_channels": 8, "num_stats": 48, "num_eval": 8, "seed": 0}


def load_script(relative: str):
    """Import a repo script (e.g. "training/train_vae.py") as a module named after its file."""
    import importlib.util

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


class MainProcess:
    """The one process of a run, as train.py's `prepare_inputs` sees an accelerator."""

    is_main_process = True

    @staticmethod
    def main_process_first():
        import contextlib

        return contextlib.nullcontext()


def make_tiny_vae(path: Path) -> Path:
    import torch

    from mmgen.vae import MMGenVAE, tiny_vae_config

    torch.manual_seed(0)  # the golden losses depend on this VAE
    vae = MMGenVAE.from_config(tiny_vae_config(base_channels=8))  # random weights: the loop, not quality
    vae.vae.save_pretrained(path)
    return path


def env(**extra) -> dict:
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out.update(extra)
    return out


def launch(args: list[str], *, launcher: list[str] | None = None, timeout: int = 300, check: bool = True,
           script: Path = TRAIN, cwd: Path = ROOT, **env_extra) -> subprocess.CompletedProcess:
    """`accelerate launch [launcher args] training/train.py --config tiny.yaml ARGS` in `cwd`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(launcher or ["--num_processes", "1"]),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script), "--config", str(TINY), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
