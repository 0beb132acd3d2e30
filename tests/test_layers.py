"""The layers of DESIGN.md, checked on the source: imports point down only (a lazy import inside a function
counts too), and no module-level import circle between kvcompress's modules."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvcompress"
# layer -> the imports it must not make (DESIGN.md: "knows about" / "must not know about")
CANNOT_IMPORT = {
    "kvcompress.cache": ["kvcompress.engine", "kvcompress.eval", "kvcompress.report", "kvcompress.loggers",
                         "kvcompress.run", "kvcompress.harness", "kvcompress.job", "kvcompress.presets", "hydra",
                         "omegaconf", "wandb"],
    "kvcompress.engine": ["kvcompress.cache.storage", "kvcompress.cache.policy", "kvcompress.cache.layout",
                          "kvcompress.eval", "kvcompress.report", "kvcompress.loggers", "kvcompress.run",
                          "kvcompress.harness", "kvcompress.job", "hydra", "wandb"],
    "kvcompress.eval": ["kvcompress.report", "kvcompress.loggers", "kvcompress.run", "kvcompress.job", "hydra",
                        "wandb"],
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in ``path``; ``from pkg import mod`` names pkg.mod."""
    tree, me = ast.parse(path.read_text()), module_name(path)
    top, out = {id(n) for n in tree.body}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")] if node.level \
                else []
            source = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                name = f"{source}.{a.name}"
                out.append((name if is_module(name) else source, id(node) in top))
    return out


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_imports_point_down_only():
    up = [f"{m} imports {t}" for m, targets in GRAPH.items() for t, _ in targets
          for layer, banned in CANNOT_IMPORT.items() if m == layer or m.startswith(layer + ".")
          for b in banned if t == b or t.startswith(b + ".")]
    assert not up, "imports that run up a layer (DESIGN.md):\n" + "\n".join(sorted(up))


def test_no_module_level_import_circle():
    edges = {m: {t for t, top in ts if top and t in GRAPH and t != m} for m, ts in GRAPH.items()}
    circles, done = [], set()

    def walk(m: str, path: list[str]) -> None:
        if m in path:
            circles.append(" -> ".join(path[path.index(m):] + [m]))
            return
        if m in done:
            return
        for t in sorted(edges[m]):
            walk(t, path + [m])
        done.add(m)

    for m in sorted(edges):
        walk(m, [])
    assert not circles, "module-level import circles:\n" + "\n".join(circles)
