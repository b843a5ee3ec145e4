"""report.md tables and PNG plots from an eval/run.py results dict (numbers stay in results.json)."""

from __future__ import annotations

from pathlib import Path

from mmgen.evaluation.shapeeval import TASKS
from mmgen.extras import pyplot

plt = pyplot("the evaluation report (eval/run.py)")  # on the Agg backend: only files are written


def _acc(v: dict | None) -> str:
    if not v or v.get("n", 0) == 0:
        return "–"
    lo, hi = v["ci95"]
    return f"{v['accuracy']:.3f} [{lo:.2f}, {hi:.2f}] (n={v['n']})"


def _parse_setting(name: str) -> tuple[int, float]:
    steps, cfg = name.split("_cfg")
    return int(steps.removeprefix("steps")), float(cfg)


def _settings(section: dict) -> list[str]:
    return sorted(section, key=_parse_setting)


def shapeeval_table(results: dict) -> list[str]:
    lines = []
    for split, runs in results.get("shapeeval", {}).items():
        lines += [f"### ShapeEval, {split} prompts", "",
                  "| setting | overall | " + " | ".join(TASKS) + " | strict | validity | off-palette |",
                  "|---|---|" + "---|" * len(TASKS) + "---|---|---|"]  # fmt: skip
        for name in _settings(runs):
            r = runs[name]
            lo, hi = r["overall_ci95"]
            cells = [f"{r['tasks'][t]['accuracy']:.3f}" if t in r["tasks"] else "–" for t in TASKS]
            lines.append(f"| {name} | **{r['overall']:.3f}** [{lo:.2f}, {hi:.2f}] | " + " | ".join(cells)
                         + f" | {_acc(r['strict'])} | {r['validity']['accuracy']:.3f} | {r['off_palette_share']:.4f} |")
        lines.append("")
    return lines


def shapefd_table(results: dict) -> list[str]:
    fd = results.get("shapefd", {})
    lines = [("### ShapeFD / ShapeKID (features: mmgen/evaluation/shapefd.safetensors, sha256 "
             f"{str(fd.get('feature_net_sha256', ''))[:12]})"), "",
             "| split | setting | ShapeFD | floor | ShapeKID | floor | n |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for split, runs in fd.items():
        if not isinstance(runs, dict):
            continue
        for name in _settings(runs):
            r = runs[name]
            lines.append(f"| {split} | {name} | {r['shapefd']:.3f} | {r.get('floor_shapefd', float('nan')):.3f} | "
                         f"{r['shapekid']:.4f} | {r.get('floor_shapekid', float('nan')):.4f} | {r['n_generated']} |")
    return lines + [""]


def understanding_table(results: dict) -> list[str]:
    u = results.get("understanding")
    if not u:
        return []
    lines = ["### Understanding (held-out split)", "", "| metric | accuracy [95% CI] (n) |", "|---|---|",
             f"| caption exact match | {_acc(u['caption']['exact_match'])} |",
             f"| caption parsed | {_acc(u['caption']['parsed'])} |"]  # fmt: skip
    lines += [f"| caption {k} | {_acc(v)} |" for k, v in u["caption"]["attributes"].items()]
    lines += [f"| VQA {k} | {_acc(v)} |" for k, v in u["vqa"]["types"].items()]
    lines += [f"| VQA macro accuracy | {u['vqa']['macro_accuracy']:.3f} |", f"| VQA micro | {_acc(u['vqa']['micro'])} |", ""]
    return lines


def interleaved_table(results: dict) -> list[str]:
    lines = []
    for name, r in results.get("interleaved", {}).items():
        e = r["emission"]
        lines += [f"### Interleaved programs ({name}, {r['num_programs']} programs)", "", "| metric | value |", "|---|---|",
                  f"| images correct vs accumulated scene | {_acc(r['image_accuracy'])} |",
                  f"| image turns with a correct image | {_acc(r['image_turn_success'])} |",
                  f"| answers correct (reference scene) | {_acc(r['answer_accuracy'])} |",
                  f"| answers consistent with own image | {_acc(r['answer_consistency_with_own_image'])} |",
                  (f"| emission precision | {e['precision']:.3f} [{e['precision_ci95'][0]:.2f}, {e['precision_ci95'][1]:.2f}] "
                  f"({e['true_positive_turns']}/{e['turns_with_image']}) |"),
                  (f"| emission recall | {e['recall']:.3f} [{e['recall_ci95'][0]:.2f}, {e['recall_ci95'][1]:.2f}] "
                  f"({e['true_positive_turns']}/{e['turns_asking_for_image']}) |"), ""]  # fmt: skip
    return lines


def speed_table(results: dict) -> list[str]:
    lines = []
    if "perplexity" in results:
        p = results["perplexity"]
        lines += [(f"### Text: perplexity {p['perplexity']:.3f} on {p['tokens']} held-out tokens "
                  f"({p['documents']} documents)"), ""]
        if "assistant" in p:  # results written before the split have the all-token number only
            a = p["assistant"]
            lines += [(f"Assistant turns only (what `data.loss_on: assistant` trains): perplexity "
                       f"{a['perplexity']:.3f} on {a['tokens']} tokens; the number above includes the user's turns."), ""]
    s = results.get("speed")
    if not s:
        return lines
    t = s["training"]
    lines += ["### Speed", "", (f"Training: {t['tokens_per_s']:.0f} tokens/s ({t['rows']}x{t['seq_len']} rows, "
              f"{t['seconds_per_step']:.3f} s/step, {t['dtype']}), MFU {t['mfu']:.4f} of {t['peak_flops'] / 1e12:.2f} "
              f"TFLOP/s ({t['peak_source']})."), ""]
    if "training_full_target" in s:
        f = s["training_full_target"]
        lines += [(f"IMM target branch over the student pass's keys/values ({t.get('target_pass', 'prefix')}): "
                   f"{t['seconds_per_step']:.3f} s/step; as a second full forward: {f['seconds_per_step']:.3f} "
                   f"s/step ({f['seconds_per_step'] / t['seconds_per_step']:.2f}x the time)."), ""]
    lines += [f"Image latency (prefix {s['image_latency']['prefix']} tokens, guidance {s['image_latency']['guidance']}):", "",
              "| steps | cached ms | no cache ms | no cache / cached | cached vs fewest steps |", "|---|---|---|---|---|"]  # fmt: skip
    for r in s["image_latency"]["rows"]:
        lines.append(f"| {r['num_steps']} | {r['cached_ms']:.1f} | {r['naive_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['cached_vs_fewest_steps']:.2f}x |")
    return lines + [""]


def plot_shapeeval(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for split, runs in results.get("shapeeval", {}).items():
        by_cfg: dict = {}
        for name in _settings(runs):
            n, w = _parse_setting(name)
            by_cfg.setdefault(w, []).append((n, runs[name]))
        for w, pts in by_cfg.items():
            xs = [n for n, _ in pts]
            ys = [r["overall"] for _, r in pts]
            err = [[y - r["overall_ci95"][0] for y, (_, r) in zip(ys, pts)],
                   [r["overall_ci95"][1] - y for y, (_, r) in zip(ys, pts)]]  # fmt: skip
            axes[0].errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{split}, cfg {w:g}")
            if split == "heldout" and w == min(by_cfg):
                for t in TASKS:
                    axes[1].plot(xs, [r["tasks"].get(t, {}).get("accuracy", float("nan")) for _, r in pts],
                                 marker="o", label=t)
    for ax, title in zip(axes, ("ShapeEval overall (95% CI)", "held-out, per task")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("num_steps")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shapefd(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for split, runs in results.get("shapefd", {}).items():
        if not isinstance(runs, dict):
            continue
        names = _settings(runs)
        xs = [_parse_setting(n)[0] for n in names]
        line = ax.plot(xs, [runs[n]["shapefd"] for n in names], marker="o", label=f"{split}")[0]
        ax.plot(xs, [runs[n].get("floor_shapefd", float("nan")) for n in names], ls="--", color=line.get_color(),
                label=f"{split} real-vs-real floor")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("num_steps")
    ax.set_ylabel("ShapeFD (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_understanding(results: dict, path: Path) -> None:
    u = results.get("understanding")
    if not u:
        return
    items = [("caption exact", u["caption"]["exact_match"])]
    items += [(f"cap. {k}", v) for k, v in u["caption"]["attributes"].items()]
    items += [(f"VQA {k}", v) for k, v in u["vqa"]["types"].items()]
    for r in results.get("interleaved", {}).values():
        items += [("multi-turn images", r["image_accuracy"]), ("multi-turn answers", r["answer_accuracy"])]
    fig, ax = plt.subplots(figsize=(9, 4))
    ys = [v["accuracy"] for _, v in items]
    err = [[max(y - v["ci95"][0], 0) for y, (_, v) in zip(ys, items)], [max(v["ci95"][1] - y, 0) for y, (_, v) in zip(ys, items)]]
    ax.bar(range(len(items)), ys, yerr=err, capsize=3)
    ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(results: dict, path: Path) -> None:
    s = results.get("speed")
    if not s:
        return
    rows = s["image_latency"]["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [r["num_steps"] for r in rows]
    ax.plot(xs, [r["cached_ms"] for r in rows], marker="o", label="cached prefix")
    ax.plot(xs, [r["naive_ms"] for r in rows], marker="o", label="full recompute")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("num_steps")
    ax.set_ylabel("ms per image")
    ax.set_title(f"prefix {s['image_latency']['prefix']} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    out = Path(out)
    lines = [f"# Evaluation of `{results['model']}`", "",
             (f"Objective {results['objective']}, config sha256 {results['config_hash'][:12]}, steps {results['steps']}, "
             f"guidance {results['guidance']}{' (QUICK mode: tiny sample counts)' if results.get('quick') else ''}. "
             "Accuracies: value [95% Wilson CI] (n); ShapeEval overall = mean of the six tasks (CI: mean of "
             "the tasks' Wilson bounds). All numbers: results.json."), ""]  # fmt: skip
    lines += shapeeval_table(results) + shapefd_table(results) + understanding_table(results)
    lines += interleaved_table(results) + speed_table(results)
    lines += ["Plots: shapeeval.png, shapefd.png, understanding.png, latency.png.", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot_shapeeval(results, out / "shapeeval.png")
    plot_shapefd(results, out / "shapefd.png")
    plot_understanding(results, out / "understanding.png")
    plot_latency(results, out / "latency.png")
