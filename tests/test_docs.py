"""The repository stands alone: it cites no document it lacks and no issue numbers, and the files its
README and docs/ name exist."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".toml", ".sh", ".txt")
# Documents that are not in the repository, and work-history references a reader cannot follow.
FORBIDDEN = re.compile(r"\b(?:CONTRACTS|DESIGN|STYLE|ENVIRONMENT)\.md\b|(?i:\bissues?\s+#?\d+|\bissue notes?\b)")
# A file path in backticks: a "/" and an extension, e.g. `eval/run.py` (no spaces, no globs).
BACKTICK_PATH = re.compile(r"`([A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)+\.[A-Za-z0-9]+)`")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
# Paths under these are written by a run or stand for the user's own files; they are not shipped.
NOT_SHIPPED = ("runs/", "shards/", "data/", "/")
PLACEHOLDER = re.compile(r"^[A-Z_]+$")  # a folder written as OUT, RUN, NAME, DIR: the reader fills it in


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in names.splitlines() if name.endswith(TEXT_SUFFIXES)]


def documentation_files() -> list[Path]:
    """README.md and every markdown file under docs/."""
    return [p for p in tracked_text_files()
            if p.suffix == ".md" and (p == ROOT / "README.md" or ROOT / "docs" in p.parents)]


def forbidden_references(text: str) -> list[str]:
    return [m.group(0) for m in FORBIDDEN.finditer(text)]


def named_paths(text: str) -> list[str]:
    """Repository paths a document names: file paths in backticks and relative markdown link targets."""
    paths = [m.group(1) for m in BACKTICK_PATH.finditer(text) if not m.group(1).startswith(NOT_SHIPPED)
             and not any(PLACEHOLDER.match(part) for part in m.group(1).split("/")[:-1])]
    return paths + [m.group(1) for m in MARKDOWN_LINK.finditer(text) if "://" not in m.group(1)]


def missing_paths(doc: Path) -> list[str]:
    # A path counts from the repository root or from the document's own folder (links inside docs/).
    return [name for name in named_paths(doc.read_text())
            if not ((ROOT / name).exists() or (doc.parent / name).exists())]


def test_no_tracked_file_cites_a_missing_document_or_an_issue_number():
    found = [f"{path.relative_to(ROOT)}: {hit}" for path in tracked_text_files() if path.is_file()
             for hit in forbidden_references(path.read_text(errors="replace"))]
    assert not found, "references a reader of the repository cannot follow:\n" + "\n".join(found)


def test_every_path_named_in_the_readme_and_docs_exists():
    assert ROOT / "docs" / "design.md" in documentation_files()
    missing = [f"{doc.relative_to(ROOT)}: {name}" for doc in documentation_files() for name in missing_paths(doc)]
    assert not missing, "paths that are not in the repository:\n" + "\n".join(missing)


def test_the_checks_find_what_they_look_for(tmp_path):
    # the examples are assembled here, so that this file itself names none of them
    design, style, issue = "DESIGN" + ".md", "STYLE" + ".md", "issue"
    text = (f"See {design} §3, {style} and {issue} 12 ({issue}s 5 and 7, the {issue} notes); the design is\n"
            "docs/design.md. Run `eval/gpu_check.sh` or `eval/run.py`, read [the notes](gone/notes.md),\n"
            "write `runs/x/curve.png` and `OUT/report.md`.\n")
    assert forbidden_references(text) == [design, style, f"{issue} 12", f"{issue}s 5", f"{issue} notes"]
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    assert named_paths(text) == ["eval/gpu_check.sh", "eval/run.py", "gone/notes.md"]
    assert missing_paths(doc) == ["eval/gpu_check.sh", "gone/notes.md"]


def test_every_cited_section_of_the_design_exists():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "design.md").read_text(), flags=re.MULTILINE))
    cited = {f"{path.relative_to(ROOT)}: §{n}" for path in tracked_text_files() if path.is_file()
             for m in re.finditer(r"design\.md §(\d+)(?:-§(\d+))?", path.read_text(errors="replace"))
             for n in filter(None, m.groups())}
    assert cited, "nothing cites docs/design.md"
    missing = sorted(c for c in cited if c.rsplit("§", 1)[1] not in sections)
    assert not missing, "docs/design.md has no such section:\n" + "\n".join(missing)
