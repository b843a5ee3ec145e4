"""Export a trained run for the Hub: model (safetensors, VAE inside) + processor + model card.

The directory loads with `AutoModel.from_pretrained(dir)` / `AutoProcessor.from_pretrained(dir)`
after `import mmgen`. It is written to a temp dir and renamed into place, so a half-written
export is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmgen.config import config_to_dict

CARD = """---
library_name: mmgen
tags: [interleaved-generation, inductive-moment-matching, text-to-image, image-to-text]
---
# {name}

An mmgen model: one transformer for text (next token) and images ({objective} flow map on
VAE latents, sampled in {steps} steps).

- Trained for {step} optimizer steps on `{data}` ({params:,} trainable parameters).
- Load: `import mmgen; from transformers import AutoModel, AutoProcessor;
  model = AutoModel.from_pretrained(DIR); processor = AutoProcessor.from_pretrained(DIR)`.
- Chat: `mmgen-chat --model DIR` (or `python -m mmgen.chat --model DIR`).

## Evaluation at the end of training (exact shapes judge)

{metrics}

## Training config

```json
{config}
```
"""


def _metrics_table(metrics: dict) -> str:
    if not metrics:
        return "(no evaluation was run)"
    lines = ["| metric | accuracy | n | 95% CI | partial verdicts |", "|---|---|---|---|---|"]
    for group in ("t2i", "caption"):
        for key, v in metrics.get(group, {}).items():
            lo, hi = v["ci95"]
            partial = " ".join(f"{k} {x:.2f}" for k, x in v.get("partial", {}).items())
            lines.append(f"| {group} {key} | {v['accuracy']:.3f} | {v['n']} | [{lo:.3f}, {hi:.3f}] | {partial} |")
    if "prompt_sensitivity" in metrics:
        ps = metrics["prompt_sensitivity"]
        lines.append(f"\nPrompt sensitivity (one-step latents, distance between prompts / between seeds; "
                     f"0 = the image ignores the text): {ps['ratio']:.3f} "
                     f"({ps['num_prompts']} prompts x {ps['num_seeds']} seeds).")
    return "\n".join(lines)


def export_final(model, processor, cfg, out_dir: str | Path, *, step: int, metrics: dict,
                 state_dict: dict | None = None) -> Path:
    out = Path(out_dir)
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = cfg.data.shapes_dir if cfg.data.source == "shapes" else cfg.data.shards
    card = CARD.format(name=cfg.run.name, objective=cfg.objective.name.upper(), steps="1-8", step=step, data=data,
                       params=params, metrics=_metrics_table(metrics),
                       config=json.dumps(config_to_dict(cfg), indent=2))
    (tmp / "README.md").write_text(card)
    (tmp / "eval.json").write_text(json.dumps(metrics, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
