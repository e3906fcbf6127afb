"""The package's shape: core, pipeline, testbed; imports go one way, with no cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moepaper"
CORE = {"architecture", "statistics", "criteria", "pruning", "damage", "provenance", "project", "progress"}


def module_name(path: Path, package_dir: Path = PACKAGE) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], package_dir: Path = PACKAGE) -> set[str]:
    """moepaper modules `path` imports (anywhere in the file, relative imports resolved);
    ``from pkg import submodule`` counts as importing both the package and the submodule."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            candidates = [target] + submodules  # `from pkg import mod` runs pkg/__init__ too
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c == "moepaper" or c.startswith("moepaper.")}
    return found


def graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    return {name: {m for m in imports_of(path, set(modules), package_dir) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """An import cycle; ``from . import x`` inside a package counts as importing the package's
    ``__init__`` when `x` is not a module, and a package whose ``__init__`` imports its modules
    back makes a cycle."""
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_the_package_init():
    for name, targets in graph().items():
        if name != "moepaper":
            assert "moepaper" not in targets, f"{name} imports moepaper/__init__ (take the version from package metadata)"


def test_imports_go_one_way():
    for name, targets in graph().items():
        part = name.split(".")[1] if "." in name else "moepaper"
        if part in CORE:
            outward = {t for t in targets if t.startswith(("moepaper.pipeline", "moepaper.testbed", "moepaper.reproduce"))}
            assert not outward, f"core module {name} imports {sorted(outward)}"
        if part == "testbed":
            assert not {t for t in targets if t.startswith(("moepaper.pipeline", "moepaper.reproduce"))}, name


def test_the_checker_sees_a_cycle(tmp_path):
    """The cycle test can fail: a two-module cycle (like the old results <-> reporting) is found."""
    fake = tmp_path / "moepaper"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("from .b import x\n")
    (fake / "b.py").write_text("def f():\n    from moepaper.a import y\n")
    (fake / "c.py").write_text("from . import __version__\n")
    edges = graph(fake)
    assert find_cycle(edges) == ["moepaper.a", "moepaper.b", "moepaper.a"]
    assert "moepaper" in edges["moepaper.c"]
    # a package whose __init__ imports a module that does `from . import sibling`: a cycle through the package
    sub = fake / "sub"
    sub.mkdir()
    (sub / "__init__.py").write_text("from .r import f\n")
    (sub / "r.py").write_text("from . import e\n")
    (sub / "e.py").write_text("")
    assert find_cycle({k: v for k, v in graph(fake).items() if k.startswith("moepaper.sub")}) == [
        "moepaper.sub", "moepaper.sub.r", "moepaper.sub"]
