"""The README's Quickstart is what CI runs: the same install command and the same test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]


def test_quickstart_has_two_commands_install_then_test():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert commands[0].startswith('pip install -e ".[dev]"')
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
