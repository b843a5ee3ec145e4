"""The package: what its top level exports, its optional extras, and the assets a wheel carries."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import transformers
from train_helpers import TINY, load_script

import mmgen
from mmgen.extras import EXTRAS, MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]


def test_the_model_config_and_processor_are_importable_from_the_package():
    from mmgen import MMGenConfig, MMGenForConditionalGeneration, MMGenProcessor

    assert set(mmgen.__all__) >= {"MMGenConfig", "MMGenForConditionalGeneration", "MMGenProcessor"}
    assert MMGenForConditionalGeneration.config_class is MMGenConfig
    assert transformers.AutoConfig.for_model("mmgen").__class__ is MMGenConfig
    assert issubclass(MMGenProcessor, transformers.ProcessorMixin)


# --- Optional dependencies (mmgen/extras.py): a missing extra is one line naming it, before any work ---

def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_each_optional_module_is_installed_by_the_extra_its_error_names_and_dev_has_them_all():
    extras = _pyproject()["project"]["optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert any(re.match(rf"{module}\b", req) for req in extras[extra]), (module, extra, extras[extra])
    (itself,) = [req for req in extras["dev"] if req.startswith("mmgen[")]
    assert set(itself.removeprefix("mmgen[").removesuffix("]").split(",")) == set(EXTRAS.values())
    core = " ".join(_pyproject()["project"]["dependencies"])
    assert not any(module in core for module in EXTRAS)


def test_a_missing_extra_is_one_line_naming_the_extra_and_its_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what an interpreter without gradio sees
    with pytest.raises(MissingExtraError) as err:
        require("gradio", "the web chat")
    assert str(err.value) == "the web chat needs the 'web' extra (gradio is not installed): pip install 'mmgen[web]'"
    assert require("json", "anything") is json  # installed modules are returned as imported


def test_the_web_chat_without_gradio_stops_before_loading_a_model(monkeypatch, capsys, tmp_path):
    from mmgen.chat import main

    monkeypatch.setitem(sys.modules, "gradio", None)
    monkeypatch.chdir(tmp_path)
    assert main(["--web", "--model", str(tmp_path / "no-model-here")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'web' extra" in err and "pip install 'mmgen[web]'" in err, err
    assert not (tmp_path / "runs").exists()


def test_training_without_tensorboard_or_matplotlib_names_the_setting_and_the_extra(monkeypatch, capsys, tmp_path):
    train = load_script("training/train.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert train.main(["--config", str(TINY), "--run.tracker", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.tracker=tensorboard") and "pip install 'mmgen[tracking]'" in err, err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert train.main(["--config", str(TINY), "--eval.curve_every", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: eval.curve_every=2") and "pip install 'mmgen[plots]'" in err, err
    assert not (tmp_path / "runs").exists()  # both stop before the run writes anything


def test_a_curve_plot_without_matplotlib_names_the_plots_extra(monkeypatch, tmp_path):
    from mmgen.training.curves import plot_curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'mmgen\[plots\]'"):
        plot_curves([tmp_path], tmp_path / "curve.png")


# --- The wheel: an installed (non-checkout) package carries the shipped configs and the shapes tokenizer ---

def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_an_installed_wheel_finds_the_default_config_and_tokenizer_from_another_directory(tmp_path):
    # A real wheel build (pip's build isolation provides setuptools) of a copy of the sources, so the checkout
    # gets no build/ folder; unpacking a pure-Python wheel is what installing it puts on sys.path.
    src, dist, site, elsewhere = (tmp_path / name for name in ("src", "dist", "site", "elsewhere"))
    for name in ("mmgen", "configs", "tokenizers"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = dist.glob("mmgen-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    assert {f"mmgen/{f}" for f in _files(ROOT / "mmgen")} <= _files(site)  # pyproject.toml lists every subpackage
    assert _files(site / "mmgen" / "_data" / "configs") == _files(ROOT / "configs")
    assert _files(site / "mmgen" / "_data" / "tokenizers" / "shapes") == _files(ROOT / "tokenizers" / "shapes")

    elsewhere.mkdir()
    probe = (  # training/train.py's --config default is ASSETS_ROOT/configs/default.yaml
        "import json, mmgen; from mmgen.config import ASSETS_ROOT, load_config, resolve_input_path as r;"
        "c = load_config(ASSETS_ROOT / 'configs/default.yaml'); z = load_config(r('configs/multigpu_zero2.yaml'));"
        "print(json.dumps([mmgen.__file__, c.run.name, c.model.tokenizer, c.run.output_dir, z.run.deepspeed_config]))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    data = site / "mmgen" / "_data"
    assert json.loads(proc.stdout.splitlines()[-1]) == [
        str(site / "mmgen" / "__init__.py"), "default", str(data / "tokenizers" / "shapes"), "runs",
        str(data / "configs" / "deepspeed" / "zero2.json"),
    ]
