"""The layers of docs/design.md, enforced: every module's imports (lazy ones inside functions included), read with
`ast`, must run one way: plumbing (common/) <- core (model, train, fireact, tools, toyworld, tasks) <- speed (fast/)
<- extras (extras/). No import cycle; model.py reaches only the plumbing; the core reaches speed only from inside a
function (the entry point that applies the fast path), never at module level; nothing but the extras reaches them.

    python -m pytest -q tests/test_layers.py
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE = {"model", "train", "fireact", "tools", "toyworld", "tasks"}


def project_modules(root: Path) -> dict:
    """{dotted module name: path} for the project's importable modules (top-level files and the packages)."""
    mods = {p.stem: p for p in root.glob("*.py")}
    for pkg in ("common", "fast", "extras"):
        for p in (root / pkg).glob("*.py"):
            mods[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return mods


def layer(name: str) -> str:
    top = name.split(".")[0]
    return {"common": "plumbing", "fast": "speed", "extras": "extras"}.get(top, "core" if top in CORE else "other")


def imports(path: Path, name: str, mods: dict) -> list:
    """-> [(imported project module, lineno, lazy)] for every import statement of the file, at any depth.
    `from pkg import sub` names the submodule when there is one; relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = pkg.split(".") if pkg else []
                    parts = parts[:len(parts) - (child.level - 1)] if child.level > 1 else parts
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in child.names]
            for t in targets:
                while t and t not in mods:      # `import fast.cpu` -> fast.cpu; `import numpy.x` -> nothing
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.append((t, child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return out


def graph(root: Path) -> dict:
    mods = project_modules(root)
    return {name: imports(path, name, mods) for name, path in mods.items()}


def cycles(g: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w, *_ in g.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def breaches(g: dict) -> list:
    """Every import that runs against the layers, as 'module:line imports X (why)'."""
    bad = []
    for name, edges in g.items():
        src = layer(name)
        for dst_name, line, lazy in edges:
            dst = layer(dst_name)
            where = f"{name}:{line} imports {dst_name}"
            if name == "model" and dst != "plumbing":
                bad.append(f"{where} (model.py reaches only the plumbing)")
            elif src == "plumbing" and dst != "plumbing":
                bad.append(f"{where} (the plumbing imports nothing above it)")
            elif dst == "extras" and src != "extras":
                bad.append(f"{where} (nothing below the extras imports them: use cli.hand_off)")
            elif src == "core" and dst == "speed" and not lazy:
                bad.append(f"{where} (the core reaches speed only inside the entry point that applies it)")
    return bad


def test_the_project_has_no_import_cycle():
    assert cycles(graph(REPO)) == []


def test_imports_run_one_way():
    g = graph(REPO)
    assert {"model", "train", "fireact", "tools"} <= set(g), sorted(g)   # the scan sees the core
    assert breaches(g) == []


def test_no_import_hidden_in_a_string():
    """importlib / __import__ / runpy would dodge the scan above: below the extras (which may import anything, and
    whose dispatcher loads its commands by name) nothing loads a module by name."""
    for name, path in project_modules(REPO).items():
        if layer(name) == "extras":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                assert called not in ("import_module", "__import__", "run_path", "run_module"), \
                    f"{path.name}:{node.lineno} loads a module by name"


@pytest.mark.parametrize("files, problem", [
    ({"model.py": "import train\n", "train.py": "def f():\n    import model\n"}, "cycle"),
    ({"model.py": "def f():\n    import fast\n", "fast/__init__.py": ""}, "model.py reaches only"),
    ({"train.py": "import fast.cpu\n", "fast/__init__.py": "", "fast/cpu.py": ""}, "only inside the entry"),
    ({"tools.py": "def f():\n    from extras import serve\n", "extras/__init__.py": "", "extras/serve.py": ""},
     "nothing below the extras"),
    ({"common/files.py": "from . import net\nimport tools\n", "common/net.py": "", "tools.py": ""},
     "the plumbing imports nothing"),
    ({"fast/decode.py": "from extras.serve import x\n", "extras/serve.py": ""}, "nothing below the extras"),
])
def test_the_scan_catches_each_breach(tmp_path, files, problem):
    """The checks above can fail: a small tree with one breach each is caught, lazily imported or not."""
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = graph(tmp_path)
    found = [" ".join(c) for c in cycles(g)] if problem == "cycle" else breaches(g)
    assert found and (problem == "cycle" or any(problem in b for b in found)), (g, found)


def test_the_scan_allows_the_layers_as_drawn(tmp_path):
    for rel, text in {"model.py": "from common import files\n", "common/files.py": "", "common/net.py":
                      "from common import files\n", "train.py": "import model\ndef main():\n    import fast\n",
                      "fast/__init__.py": "import model\n", "extras/__main__.py": "import fast, train\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = graph(tmp_path)
    assert cycles(g) == [] and breaches(g) == [] and ("fast", 3, True) in g["train"]
