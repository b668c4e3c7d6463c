"""The project's layering, read from the source: no import circle among its own modules, the
engine's sub-packages import only the layers below them, and neither the engine nor the TUI's
start-up path loads what it must not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "widgets", "workbench", "sample_models", "bench")
# Each engine sub-package may import only the packages of earlier layers (and its own).
ENGINE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("common",),
    ("models",),
    ("gkp", "data"),
    ("baselines", "formats", "robustness"),
    ("training",),
    ("itp", "adasap"),
    ("config",),
    ("pipeline", "report"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports at run time, at any depth (function-level imports
    included, `if TYPE_CHECKING:` blocks not)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child.module, child.level)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    add(full if full in known else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_graph_reader_sees_relative_and_lazy_imports() -> None:
    graph = import_graph()
    assert "engine.gkp.plan" in graph["engine.formats.checkpoints"]  # `from ..gkp.plan import`
    assert "engine.gkp.reconstruct" in graph["engine.formats.checkpoints"]  # inside a function
    assert "workbench.tasks" in graph["workbench.app"]  # `from . import tasks`
    assert "engine.pipeline" not in graph["engine.report"]  # under TYPE_CHECKING only


def test_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_the_projects_modules() -> None:
    assert cycles(import_graph()) == []


def test_engine_imports_nothing_above_it() -> None:
    forbidden = ("workbench", "widgets", "sample_models", "bench", "textual", "rich")
    for name, path in project_modules().items():
        if not name.startswith("engine"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            )
            bad = [t for t in targets if t.split(".")[0] in forbidden]
            assert not bad, f"{name} imports {bad}"


def engine_part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_engine_sub_packages_import_only_lower_layers() -> None:
    layer_of = {part: i for i, parts in enumerate(ENGINE_LAYERS) for part in parts}
    graph = import_graph()
    packages = {p.name for p in (REPO / "engine").iterdir() if (p / "__init__.py").is_file()}
    tops = {p.stem for p in (REPO / "engine").glob("*.py") if p.stem != "__init__"}
    assert packages | tops == set(layer_of), "every engine part has a layer"
    upward = [
        f"{name} imports {target}"
        for name, targets in sorted(graph.items()) if name.startswith("engine.")
        for target in sorted(targets) if target.startswith("engine.")
        if engine_part(name) != engine_part(target) and layer_of[engine_part(target)] >= layer_of[engine_part(name)]
    ]
    assert upward == []


def test_importing_every_engine_module_loads_no_ui_library() -> None:
    modules = sorted(m for m in project_modules() if m.startswith("engine"))
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "missing = [n for n in " + repr(modules) + " if n not in sys.modules]\n"
        "assert not missing, missing\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich', 'workbench', 'widgets'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_workbench_starts_without_torch() -> None:
    """Importing torch takes seconds; the app, its screens and the default config must not need
    it, so the first screen draws before the open worker loads the engine."""
    code = (
        "import sys\n"
        "import workbench.app, workbench.cli, workbench.screens.jobs, workbench.screens.prune\n"
        "assert 'workbench.app' in sys.modules\n"
        "workbench.app.build_config(None, {'prune.method': 'tmi-gkp', 'finetune.mode': 'sam'}).to_toml()\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'torchattacks', 'scipy', 'sklearn'})\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
