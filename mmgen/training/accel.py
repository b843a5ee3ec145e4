"""Building an `Accelerator` whose multi-process runs are real, on GPUs and on CPU.

accelerate has silent failure modes without CUDA (seen with accelerate 1.15):
- without DeepSpeed, processes only form a group when `cpu=True` is passed;
- with DeepSpeed on CPU, `cpu=True` silently drops DeepSpeed; the gloo backend must be requested
  through `InitProcessGroupKwargs(backend="gloo")` instead.
`build_accelerator` applies those rules and `check_world_size` asserts that the launcher's
WORLD_SIZE is what accelerate actually built, so two unsynchronised copies never train silently.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from mmgen.extras import require


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def build_accelerator(*, mixed_precision: str, grad_accum: int, project_dir: str, tracker: str):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    if tracker == "tensorboard":  # accelerate drops a tracker that is not installed without a word
        require("tensorboard", "run.tracker=tensorboard (run.tracker=none turns it off)")
    has_cuda = torch.cuda.is_available()
    use_deepspeed = _deepspeed_requested()
    kwargs: dict = {
        "gradient_accumulation_steps": grad_accum,
        "project_config": ProjectConfiguration(project_dir=project_dir, logging_dir=os.path.join(project_dir, "logs")),
        "log_with": None if tracker == "none" else tracker,
    }
    # fp16 autocast is not supported on CPU; bf16 is (and ~2x faster on this machine's AVX-512 bf16).
    kwargs["mixed_precision"] = "bf16" if (mixed_precision == "fp16" and not has_cuda) else mixed_precision
    if not has_cuda:
        if use_deepspeed:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10))]
        else:
            kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    check_world_size(accelerator)
    return accelerator


def check_world_size(accelerator) -> None:
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"accelerate built {accelerator.num_processes} process(es) but the launcher started WORLD_SIZE={expected}: "
            "the processes would train unsynchronised copies. On CPU launch with `--multi_gpu --num_processes N` "
            "(DDP) or `--use_deepspeed --num_processes N`."
        )
