"""Re-judge a finished `eval/run.py` output directory from its files alone
(generators and judges talk through files, so any judge can score any generator).

    python eval/judge.py OUT_DIR [--write]

Reads OUT_DIR/runs/*/metadata.jsonl and the images beside them, scores every run again with the exact
judge and the grammar parser (ShapeEval, understanding, interleaved) and recomputes ShapeFD/ShapeKID from
the images on disk. Prints whether the judged numbers equal those in OUT_DIR/results.json; with --write,
stores them as OUT_DIR/rejudged.json. `judge_all` is also what run.py calls after generating.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmgen.evaluation.judge import JUDGED_SECTIONS, judge_all, same


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--write", action="store_true", help="write OUT_DIR/rejudged.json")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    judged = judge_all(out_dir)
    results_path = out_dir / "results.json"
    if results_path.is_file():
        saved = json.loads(results_path.read_text())
        for key in JUDGED_SECTIONS:
            if key in judged or key in saved:
                status = "identical" if same(judged.get(key), saved.get(key)) else "DIFFERENT"
                print(f"{key}: {status} to results.json")
    if args.write:
        (out_dir / "rejudged.json").write_text(json.dumps(judged, indent=2))
        print(f"wrote {out_dir / 'rejudged.json'}")
    return judged


if __name__ == "__main__":
    main()
