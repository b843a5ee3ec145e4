"""Specifications of the evaluation suite (eval/run.py and its modules)."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from modeling_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))  # eval/ holds scripts, not a package
import colour_confusion
import plot_nfe
import quick_t2i
import run

from mmgen.data.judge import judge_image
from mmgen.data.shapes import Scene, ShapeObject, render, sample_scene
from mmgen.evaluation import interleaved, shapeeval, shapefd
from mmgen.evaluation.judge import JUDGED_SECTIONS, judge_all

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from mmgen.modeling_mmgen import MMGenForConditionalGeneration
    from mmgen.processing_mmgen import MMGenProcessor
    from mmgen.tokenization import load_tokenizer

    torch.manual_seed(0)
    model = MMGenForConditionalGeneration(tiny_config()).eval()
    processor = MMGenProcessor.from_config(model.config, load_tokenizer(str(ROOT / "tokenizers" / "shapes")))
    path = tmp_path_factory.mktemp("tiny_export")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quick_run(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_quick")
    results = run.main(["--model", str(tiny_export), "--quick", "--steps", "1,2", "--out", str(out)])
    return out, results


# ------------------------------------------------------------------------------------------- the command


def test_quick_run_writes_results_report_and_plots(quick_run):
    out, _ = quick_run
    saved = json.loads((out / "results.json").read_text())
    for key in ("config_hash", "seeds", "sample_counts", "shapeeval", "shapefd", "understanding", "interleaved",
                "perplexity", "speed"):  # fmt: skip
        assert key in saved, key
    assert set(saved["shapeeval"]) == {"heldout", "train"}
    assert set(saved["shapeeval"]["heldout"]) == {"steps1_cfg1", "steps2_cfg1"}
    overall = saved["shapeeval"]["heldout"]["steps1_cfg1"]
    assert overall["n"] == 7 and set(overall["tasks"]) == set(shapeeval.TASKS) | {"other"}
    for acc in overall["tasks"].values():  # every accuracy carries its interval
        assert 0.0 <= acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1] <= 1.0
    assert saved["speed"]["training"]["tokens_per_s"] > 0 and saved["perplexity"]["perplexity"] > 1
    # an IMM model's training step is timed with both target branches, for the ratio in the report
    assert [saved["speed"][k]["target_pass"] for k in ("training", "training_full_target")] == ["prefix", "full"]
    ppl = saved["perplexity"]  # the assistant's turns are a strict subset of the text tokens
    assert 0 < ppl["assistant"]["tokens"] < ppl["tokens"] and ppl["assistant"]["perplexity"] > 1
    report = (out / "report.md").read_text()
    assert "ShapeEval, heldout prompts" in report and "emission precision" in report
    assert "Assistant turns only" in report and "as a second full forward" in report
    for name in ("shapeeval.png", "shapefd.png", "understanding.png", "latency.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    rows = shapeeval.read_jsonl(out / "runs" / "t2i" / "heldout" / "steps2_cfg1" / "metadata.jsonl")
    assert len(rows) == 7 and all((out / "runs" / "t2i" / "heldout" / "steps2_cfg1" / r["image"]).is_file() for r in rows)


def test_rejudging_the_saved_run_gives_identical_numbers(quick_run):
    out, _ = quick_run
    saved = json.loads((out / "results.json").read_text())
    again = json.loads(json.dumps(judge_all(out)))
    for key in JUDGED_SECTIONS:
        assert json.dumps(again[key], sort_keys=True) == json.dumps(saved[key], sort_keys=True), key


def test_plot_nfe_reads_two_result_dirs(quick_run, tmp_path):
    out, _ = quick_run
    data = plot_nfe.main([str(out), str(out), "--out", str(tmp_path)])
    assert (tmp_path / "nfe.png").is_file()
    (curve,) = next(iter(data.values())).values()
    assert [point[0] for point in curve] == [1, 2]  # NFE = num_steps without guidance


@pytest.mark.parametrize("args, message", [
    (["--model", "nope/dir"], "no such model directory: nope/dir"),
    (["--model", "EMPTY"], "cannot load the model from"),
    (["--model", "MODEL", "--steps", "0"], "--steps: expected comma-separated whole numbers >= 1, got '0'"),
    (["--model", "MODEL", "--steps", "2,x"], "--steps: expected comma-separated whole numbers >= 1, got '2,x'"),
    (["--model", "MODEL", "--cfg", "-1"], "--cfg: expected comma-separated numbers >= 0.0, got '-1'"),
    (["--model", "MODEL", "--skip", "speeed"], "--skip: unknown suite(s) ['speeed']"),
    (["--model", "MODEL", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])  # fmt: skip
def test_bad_arguments_are_named_before_any_output(tiny_export, tmp_path, args, message):
    from mmgen.cli import UsageError

    (tmp_path / "empty").mkdir()
    args = [{"MODEL": str(tiny_export), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in args]
    with pytest.raises(UsageError, match=re.escape(message)):
        run.main([*args, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_command_line_prints_one_line_and_exits_2(tiny_export, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "run.py"), "--model", str(tiny_export), "--steps", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "error: --steps: expected comma-separated whole numbers >= 1, got '0'\n"


# ------------------------------------------------------------------------------------------- ShapeFD / KID


def test_frechet_distance_is_zero_on_itself_and_grows_under_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g, dtype=torch.float64)
    assert shapefd.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert shapefd.frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # ||mu shift||^2, same cov
    b = torch.randn(500, 8, generator=g, dtype=torch.float64) * 2.0  # scaled: Tr(S_a + S_b - 2 sqrt) ~ 8
    assert shapefd.frechet_distance(a, b) > 5.0


def test_kid_is_unbiased_near_zero_for_the_same_distribution_and_positive_under_a_shift():
    g = torch.Generator().manual_seed(1)
    same = [shapefd.kernel_inception_distance(torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g))
            for _ in range(20)]  # fmt: skip
    shifted = shapefd.kernel_inception_distance(torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g) + 0.5)
    assert abs(sum(same) / len(same)) < 0.01  # unbiased: the mean over repeats sits at zero
    assert min(same) < 0 < max(same)  # an unbiased estimate takes both signs around zero
    assert shifted > 10 * max(abs(v) for v in same)


def test_stored_feature_net_matches_its_hash_and_separates_renders_from_noise():
    net, digest = shapefd.load_feature_net()
    assert digest == json.loads(shapefd.INFO.read_text())["sha256"]
    rng = random.Random(0)
    real = [render(sample_scene(rng), 32) for _ in range(64)]
    real2 = [render(sample_scene(rng), 32) for _ in range(64)]
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 255, (64,), generator=g).tolist()
    noise = [render(Scene(()), 32).point(lambda v, k=k: (v + k) % 256) for k in offsets]  # flat random colours
    fa, fb, fn = (shapefd.extract_features(net, x) for x in (real, real2, noise))
    assert shapefd.frechet_distance(fa, fn) > 5 * shapefd.frechet_distance(fa, fb)


# ------------------------------------------------------------------------------------------- ShapeEval


@pytest.mark.parametrize(
    "spec,expected",
    [
        ({"objects": [{"colour": "red", "shape": "circle", "count": 1}], "relations": []}, "single"),
        ({"objects": [{"colour": "red", "shape": "circle", "count": 3}], "relations": []}, "counting"),
        ({"objects": [{"colour": "red", "shape": "circle", "count": 1},
                      {"colour": "blue", "shape": "square", "count": 1}], "relations": []}, "two"),
        ({"objects": [{"colour": "red", "shape": "circle", "count": 1},
                      {"colour": "blue", "shape": "square", "count": 1}],
          "relations": [{"a": 0, "relation": "left of", "b": 1}]}, "position"),
        ({"objects": [{"colour": "red", "shape": "circle", "count": 2},
                      {"colour": "blue", "shape": "square", "count": 1}], "relations": []}, "other"),
        ({"objects": [{"colour": "red", "shape": "circle", "count": 1}, {"colour": "blue", "shape": "square", "count": 1},
                      {"colour": "green", "shape": "triangle", "count": 1}], "relations": []}, "other"),
    ],
)  # fmt: skip
def test_prompt_class_of_hand_made_specs(spec, expected):
    assert shapeeval.prompt_class(spec) == expected


def test_prompt_set_alternates_single_and_two_object_prompts_between_their_tasks():
    items = shapeeval.prompt_set("heldout", 3)
    by_task = {t: [i for i in items if i["task"] == t] for t in shapeeval.TASKS}
    assert all(len(v) == 3 for v in by_task.values())
    assert all(shapeeval.prompt_class(i["spec"]) == "single" for i in by_task["colors"])
    assert all(shapeeval.prompt_class(i["spec"]) == "position" for i in by_task["position"])
    assert len({i["doc_index"] for i in items}) == len(items)  # disjoint prompt sets


def test_task_verdicts_follow_geneval_on_hand_made_images():
    red_circle = {"objects": [{"colour": "red", "shape": "circle", "count": 1}], "relations": []}
    blue_circle = judge_image(render(Scene((ShapeObject("circle", "blue", "large", 0.5, 0.5),)), 32))
    assert shapeeval.task_verdict("single_object", red_circle, blue_circle)  # the shape is what counts
    assert not shapeeval.task_verdict("colors", red_circle, blue_circle)  # the colour is wrong
    left = {"objects": [{"colour": "red", "shape": "circle", "count": 1}, {"colour": "blue", "shape": "square", "count": 1}],
            "relations": [{"a": 0, "relation": "left of", "b": 1}]}  # fmt: skip
    ok = Scene((ShapeObject("circle", "red", "medium", 0.25, 0.5), ShapeObject("square", "blue", "medium", 0.75, 0.5)))
    swapped = Scene((ShapeObject("circle", "red", "medium", 0.75, 0.5), ShapeObject("square", "blue", "medium", 0.25, 0.5)))
    assert shapeeval.task_verdict("position", left, judge_image(render(ok, 32)))
    assert not shapeeval.task_verdict("position", left, judge_image(render(swapped, 32)))
    assert shapeeval.task_verdict("colour_attr", left, judge_image(render(swapped, 32)))  # binding right, place not
    wrong_binding = Scene((ShapeObject("circle", "blue", "medium", 0.25, 0.5), ShapeObject("square", "red", "medium", 0.75, 0.5)))
    assert shapeeval.task_verdict("two_object", left, judge_image(render(wrong_binding, 32)))
    assert not shapeeval.task_verdict("colour_attr", left, judge_image(render(wrong_binding, 32)))


# ------------------------------------------------------------------------------------------- interleaved


def test_emission_precision_and_recall_on_a_hand_made_transcript():
    transcript = [
        {"expects_image": True, "images": ["a.png"]},  # true positive
        {"expects_image": True, "images": []},  # missed image
        {"expects_image": False, "images": ["b.png", "c.png"]},  # image nobody asked for (one turn)
        {"expects_image": False, "images": []},  # true negative
        {"expects_image": True, "images": ["d.png"]},  # true positive
    ]
    stats = interleaved.emission_stats(transcript)
    assert stats["precision"] == pytest.approx(2 / 3) and stats["recall"] == pytest.approx(2 / 3)
    assert (stats["turns_with_image"], stats["turns_asking_for_image"]) == (3, 3)
    assert stats["precision_ci95"][0] < 2 / 3 < stats["precision_ci95"][1]


def test_program_requests_accumulate_objects_and_relations():
    progs = interleaved.programs("heldout", 5)
    for p in progs:
        image_turns = [t for t in p["turns"] if t["expects_image"]]
        for k, t in enumerate(image_turns):
            assert len(t["request"]["objects"]) == k + 1  # one object more per image turn
        # the reference render of a program's final scene satisfies its final request
    doc_scenes = [d["meta"]["scenes"][-1] for d in __import__("mmgen.data.shapes_docs", fromlist=["x"]).iter_documents(
        5, seed=shapeeval.TEST_SEED + 4, split="heldout", tasks=["multiturn"])]  # fmt: skip
    for p, scene in zip(progs, doc_scenes):
        last = [t for t in p["turns"] if t["expects_image"]][-1]
        assert interleaved.request_verdict(last["request"], judge_image(render(Scene.from_dict(scene), 32)))


def test_quick_t2i_writes_accuracies_captions_and_prompt_sensitivity(tiny_export, tmp_path):
    out = tmp_path / "quick.json"
    results = quick_t2i.main(["--model", str(tiny_export), "--out", str(out), "--steps", "1", "--num", "2"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["single@1"]["n"] == 2 and results["two@1"]["n"] == 2 and results["caption"]["n"] == 2
    assert 0.0 <= results["single@1"]["valid"] <= 1.0
    assert results["prompt_sensitivity"]["ratio"] > 0  # an untrained model's image already moves with the prompt


def test_end_of_run_evaluation_reports_partial_verdicts_and_the_model_card_shows_them(tiny_export):
    from transformers import AutoModel, AutoProcessor

    from mmgen.config import load_config
    from mmgen.evaluation.quick import PARTIAL_VERDICTS, end_of_run_evaluation
    from mmgen.training.export import _metrics_table

    model = AutoModel.from_pretrained(tiny_export).eval()
    processor = AutoProcessor.from_pretrained(tiny_export)
    cfg = load_config(None, ["--eval.num_samples", "2", "--eval.num_steps", "1", "--model.image_size",
                             str(processor.image_size)])  # fmt: skip
    metrics = end_of_run_evaluation(model, processor, cfg)
    cell = metrics["t2i"]["train/single@1"]
    assert cell["n"] == 2 and set(cell["partial"]) == set(PARTIAL_VERDICTS)
    assert all(0.0 <= x <= 1.0 for x in cell["partial"].values())
    assert "nothing_extra" in _metrics_table(metrics) and "train/single@1" in metrics["summary"]


def test_colour_confusion_of_renders_is_the_identity_and_names_a_swap(tiny_export, tmp_path):
    from mmgen.data.shapes import COLOURS

    rng = random.Random(0)
    renders = {c: [render(sample_scene(rng, split="heldout", combos=[(c, "square")])) for _ in range(2)]
               for c in COLOURS}  # fmt: skip
    exact = colour_confusion.confusion(renders)
    assert exact["diagonal"] == [1.0] * len(COLOURS) and all(0.02 < f < 0.2 for f in exact["foreground"])
    swapped = colour_confusion.confusion({**renders, "red": renders["blue"]})
    assert swapped["matrix"][COLOURS.index("red")][COLOURS.index("blue")] == 1.0
    assert swapped["diagonal_mean"] == pytest.approx(1 - 1 / len(COLOURS))
    result = colour_confusion.main(["--model", str(tiny_export), "--out", str(tmp_path), "--per-colour", "2",
                                    "--steps", "1"])  # fmt: skip
    saved = json.loads((tmp_path / "colour_confusion.json").read_text())
    assert saved["matrix"] == result["matrix"] and len(saved["matrix"]) == len(COLOURS)
    assert all(abs(sum(row) - 1) < 1e-9 or sum(row) == 0 for row in saved["matrix"])
    assert (tmp_path / "colour_confusion.png").read_bytes()[:4] == b"\x89PNG"
