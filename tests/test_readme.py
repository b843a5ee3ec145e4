"""The README's Quickstart is what CI runs: the same install command and the same test command."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]


def test_quickstart_has_two_commands_install_then_test():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert commands[0].startswith('pip install -c constraints.txt -e ".[dev]"')
    assert commands[1] == "pytest"


def test_ci_runs_exactly_the_readme_commands():
    install, test = quickstart_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    install_step = install.split("&&")[0].strip()
    assert install_step in ci_lines, f"CI must run the README install step {install_step!r}"
    assert test in ci_lines, f"CI must run the README test command {test!r}"


def test_tokenizers_dir_is_not_a_python_package():
    # A `tokenizers/__init__.py` would shadow Hugging Face's `tokenizers` package.
    assert not (ROOT / "tokenizers" / "__init__.py").exists()


def test_the_install_constraints_pin_every_dependency_and_torch_exactly():
    # pyproject.toml states ranges; the Quickstart installs with constraints.txt, so CI and users get the tested
    # set, and torch the CPU-or-preinstalled build of one version rather than whatever CUDA build a range finds.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    names = {_normal(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in required} - {"mmgen"}
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    pins = dict(line.split("==") for line in lines)
    assert names <= {_normal(name) for name in pins}, names - {_normal(name) for name in pins}
    assert pins["torch"] == "2.13.0"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
