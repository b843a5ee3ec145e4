"""How the library's modules may depend on each other, read from their import statements (lazy ones too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """mmgen module -> the mmgen modules it imports (a `from package import name` counts `package.name`)."""
    modules = {_module_name(p): p for p in (ROOT / "mmgen").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {t for t in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if t in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        graph[name] = found - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_two_library_modules_import_each_other_even_indirectly():
    assert _cycle(_imports()) is None


def test_the_data_pipeline_imports_no_model_objective_or_training_module():
    # mmgen.vae: the frozen codec that turns images into latents (make_shards --vae caches them in shards)
    allowed = ("mmgen.data", "mmgen.layout", "mmgen.tokenization", "mmgen.cli", "mmgen.vae")
    for name, deps in _imports().items():
        if name.startswith("mmgen.data"):
            assert all(d.startswith(allowed) for d in deps), (name, sorted(deps))


def test_the_model_its_config_and_processor_know_no_objective_sampler_or_training():
    forbidden = ("mmgen.objectives", "mmgen.sampling", "mmgen.training", "mmgen.generation", "mmgen.evaluation")
    graph = _imports()
    for name in ("mmgen.modeling_mmgen", "mmgen.configuration_mmgen", "mmgen.processing_mmgen"):
        assert not [d for d in graph[name] if d.startswith(forbidden)], name


def test_no_library_file_reaches_into_the_scripts_folders():
    for path in (ROOT / "mmgen").rglob("*.py"):
        text = path.read_text()
        assert "sys.path.insert" not in text and "sys.path.append" not in text, path
