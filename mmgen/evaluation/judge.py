"""Judge a finished evaluation output directory from its files alone (generators and judges talk
through files: `metadata.jsonl` per run and the images beside it). CLI: `eval/judge.py`.

Reads OUT_DIR/runs/*/metadata.jsonl and the images beside them, scores every run again with the exact
judge and the grammar parser (ShapeEval, understanding, interleaved) and recomputes ShapeFD/ShapeKID from
the images on disk. Prints whether the judged numbers equal those in OUT_DIR/results.json; with --write,
stores them as OUT_DIR/rejudged.json. `judge_all` is also what run.py calls after generating.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mmgen.data.shapes import Scene, render
from mmgen.evaluation import shapefd
from mmgen.evaluation.interleaved import judge_interleaved_run
from mmgen.evaluation.shapeeval import judge_t2i_run, read_jsonl, summarise_t2i
from mmgen.evaluation.understanding import judge_understanding_run

JUDGED_SECTIONS = ("shapeeval", "shapefd", "understanding", "interleaved")


def _load_images(run_dir: Path, names: list[str]) -> list[Image.Image]:
    out = []
    for name in names:
        with Image.open(run_dir / name) as im:
            out.append(im.convert("RGB"))
    return out


def _t2i_runs(out_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (out_dir / "runs" / "t2i").glob("*/*/metadata.jsonl"))


def judge_all(out_dir: Path) -> dict:
    """Judged sections of results.json, from OUT_DIR/runs only: ShapeEval, ShapeFD, understanding, interleaved."""
    out_dir = Path(out_dir)
    results: dict = {"shapeeval": {}, "shapefd": {}}
    t2i_runs = _t2i_runs(out_dir)
    net, digest = shapefd.load_feature_net() if t2i_runs else (None, None)
    reference_dir = out_dir / "runs" / "reference"
    floor_feats = None
    if net is not None and (reference_dir / "metadata.jsonl").is_file():
        ref_rows = read_jsonl(reference_dir / "metadata.jsonl")
        floor_feats = shapefd.extract_features(net, _load_images(reference_dir, [r["image"] for r in ref_rows]))
    for run_dir in t2i_runs:
        split, setting = run_dir.parent.name, run_dir.name
        scores = judge_t2i_run(run_dir)
        results["shapeeval"].setdefault(split, {})[setting] = summarise_t2i(scores)
        rows = read_jsonl(run_dir / "metadata.jsonl")
        gen = shapefd.extract_features(net, _load_images(run_dir, [r["image"] for r in rows]))
        # the reference: true renders of the very scenes the prompts were written from, same size
        res = Image.open(run_dir / rows[0]["image"]).size[0]
        real = shapefd.extract_features(net, [render(Scene.from_dict(r["scene"]), res) for r in rows])
        entry = shapefd.distances(gen, real)
        if floor_feats is not None:  # real vs independent real at the same size: the best a model can get
            n = min(len(floor_feats), len(real))
            floor = shapefd.distances(floor_feats[:n], real[:n])
            entry["floor_shapefd"], entry["floor_shapekid"] = floor["shapefd"], floor["shapekid"]
        results["shapefd"].setdefault(split, {})[setting] = entry
    if digest is not None:
        results["shapefd"]["feature_net_sha256"] = digest
    if (out_dir / "runs" / "understanding" / "metadata.jsonl").is_file():
        results["understanding"] = judge_understanding_run(out_dir / "runs" / "understanding")
    inter = sorted(p.parent for p in (out_dir / "runs" / "interleaved").glob("*/metadata.jsonl"))
    if inter:
        results["interleaved"] = {d.name: judge_interleaved_run(d) for d in inter}
    return results


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
