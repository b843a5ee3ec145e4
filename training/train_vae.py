"""Stage 1 of the embedded default run: train the shapes-world VAE (:mod:`mmgen.training.vae_stage`).

    python training/train_vae.py [--out runs/vae] [--steps N] [--resolution 32] [--seed S] [--force] ...

Every field of :class:`mmgen.training.vae_stage.VAETrainConfig` is a flag (``--downsample-factor 4``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from mmgen.training.vae_stage import VAETrainConfig, is_complete, train_vae


def parse_args(argv=None) -> VAETrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(VAETrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default)
    parser.add_argument("--force", action="store_true", help="retrain even if --out is complete")
    args = vars(parser.parse_args(argv))
    force = args.pop("force")
    return VAETrainConfig(**args), force


def main(argv=None) -> None:
    cfg, force = parse_args(argv)
    if is_complete(cfg.out) and not force:
        print(f"{cfg.out} is complete; nothing to do (--force retrains)")
        return
    out = train_vae(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    print(json.dumps({k: metrics[k] for k in ("eval_train", "eval_heldout_combos", "num_params",
                                              "wall_seconds", "heldout_normalised_latent_std")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
