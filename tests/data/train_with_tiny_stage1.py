"""training/train.py exactly as run by a user, except that stage 1 (mmgen.training.vae_stage), which it runs when
model.vae is missing, is shrunk from minutes to seconds: stage 1's size is not a setting of train.py.

    accelerate launch tests/data/train_with_tiny_stage1.py ARGS   # = accelerate launch training/train.py ARGS
"""

import functools
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from train_helpers import TINY_STAGE1

from mmgen.training import vae_stage

# downsample 4: 8x8 latents, the 16 image tokens per image that tests/data/tiny_train.yaml's rows are sized for
vae_stage.VAETrainConfig = functools.partial(vae_stage.VAETrainConfig, **TINY_STAGE1, downsample_factor=4)
sys.argv[0] = str(ROOT / "training" / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
