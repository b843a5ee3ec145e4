"""What users type or point at (mmgen/cli.py): one-line errors, text the tokenizer cannot take, model paths."""

from __future__ import annotations

import pytest

from mmgen.cli import ArgumentParser, UsageError, run_cli, text_problem
from mmgen.loading import check_model_source, looks_local


def test_a_usage_error_is_one_line_and_status_2_and_debug_shows_the_traceback(capsys):
    def main(argv):
        parser = ArgumentParser(prog="tool")
        parser.add_argument("--n", type=int)
        parser.add_argument("--debug", action="store_true")
        args = parser.parse_args(argv)
        if args.n < 1:
            raise UsageError(f"--n must be >= 1, got {args.n}")
        return 0

    assert run_cli(main, ["--n", "0"]) == 2
    assert capsys.readouterr().err == "error: --n must be >= 1, got 0\n"
    assert run_cli(main, ["--n", "x"]) == 2  # argparse's own errors: one line too, no usage block
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'x' (see tool --help)\n"
    with pytest.raises(UsageError, match="--n must be >= 1"):
        run_cli(main, ["--n", "0", "--debug"])
    assert run_cli(main, ["--n", "3"]) == 0


def test_text_with_undecodable_bytes_is_named_by_byte_and_position():
    assert text_problem("Draw a red circle.") is None
    assert text_problem("Draw a \udcff circle.") == (
        "not valid UTF-8 text (byte 0xff at character 7; check the terminal's or file's encoding)")
    assert "lone surrogate U+D800 at character 0" in text_problem("\ud800")


def test_one_bad_prompt_is_refused_before_the_batch_runs():
    """generate_images_for_prompts checks every prompt first (no model is needed to be refused)."""
    from mmgen.generation import generate_images_for_prompts

    with pytest.raises(ValueError, match=r"prompt 1 'a \\udcff circle': not valid UTF-8 text \(byte 0xff"):
        generate_images_for_prompts(None, None, ["a red square", "a \udcff circle", "a blue circle"])


@pytest.mark.parametrize("name, offline, local", [
    ("org/name", False, False),  # a Hub id
    ("org/name", True, True),  # the Hub is offline: only a directory can be meant
    ("nope/dir/x", False, True),  # more than one org/name pair
    ("./model", False, True),
    ("/abs/model", False, True),
    ("~/model", False, True),
])  # fmt: skip
def test_a_model_argument_is_a_path_when_it_cannot_be_a_hub_id(monkeypatch, name, offline, local):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: offline)
    assert looks_local(name) is local
    if local:
        with pytest.raises(UsageError, match=f"^no such model directory: {name}$"):
            check_model_source(name)
    else:
        check_model_source(name)  # left to the Hub, which names what it cannot find


def test_an_existing_directory_passes_and_a_file_is_named(tmp_path):
    check_model_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="a file, not a model directory"):
        check_model_source(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("script", ["quick_t2i", "colour_confusion"])
def test_eval_scripts_name_a_bad_model_or_step_count_in_one_line(script, tmp_path, capsys, monkeypatch):
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "eval"))
    module = importlib.import_module(script)
    out = str(tmp_path / "out")
    assert run_cli(module.main, ["--model", str(tmp_path / "missing"), "--out", out]) == 2
    assert capsys.readouterr().err == f"error: no such model directory: {tmp_path / 'missing'}\n"
    assert run_cli(module.main, ["--model", str(tmp_path), "--out", out]) == 2  # a directory, not an export
    assert capsys.readouterr().err.startswith(f"error: --model {tmp_path}: cannot load the model from it (")
    assert run_cli(module.main, ["--model", str(tmp_path), "--out", out, "--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: --steps must be >= 1, got 0\n"
    assert not (tmp_path / "out").exists()
    sys.modules.pop(script, None)
