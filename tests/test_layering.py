"""The package's floor plan (DESIGN.md, "Layers"): modules below the public API never import
the package `fastattn` itself or names from its __init__ -- only the submodules they need --
and their module-level imports form no circle. Compiled extensions load only through
fastattn/_extension.py. The users' rooms (models, bench, integrations, cli, nn,
flash_attn_compat, selfcheck) may use the public API like any user.

The checker reads the sources (ast), so it sees lazy imports inside functions too."""

from __future__ import annotations

import ast
import os
import sys

PKG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "python_pkg", "fastattn")
USER_ROOMS = ("models", "bench", "integrations", "cli", "nn", "flash_attn_compat", "selfcheck",
              "__main__")
EXTENSIONS = ("_C", "_cuda")


def _modules(pkg_dir=PKG_DIR) -> dict[str, str]:
    """dotted name -> path for every module of the package."""
    out = {}
    for d, _, files in os.walk(pkg_dir):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), pkg_dir)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(["fastattn", *rel])] = os.path.join(d, f)
    return out


def _is_package(name, mods, paths) -> bool:
    return paths.get(name, "").endswith("__init__.py")


def _imports(name, path, mods):
    """(target module or package-level name, imported name or None, module_level, lineno)."""
    tree = ast.parse(open(path).read(), path)
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    module_level = {id(n) for n in tree.body}
    # statements directly under `if`/`try` at module level run at import too
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            for sub in ast.walk(n):
                module_level.add(id(sub))
    for node in ast.walk(tree):
        top = id(node) in module_level
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "fastattn" or a.name.startswith("fastattn."):
                    yield a.name, None, top, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "fastattn" or target.startswith("fastattn."):
                for a in node.names:
                    yield target, a.name, top, node.lineno


def _is_user_room(name) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and parts[1] in USER_ROOMS


def layering_violations(pkg_dir=PKG_DIR) -> list[str]:
    mods = _modules(pkg_dir)
    bad = []
    for name, path in sorted(mods.items()):
        if name == "fastattn" or _is_user_room(name):
            continue
        for target, imported, _top, line in _imports(name, path, mods):
            where = f"{os.path.relpath(path, pkg_dir)}:{line}"
            if target == "fastattn":
                if imported is None:
                    bad.append(f"{where}: imports the package fastattn")
                elif imported in EXTENSIONS and not name.endswith("_extension"):
                    bad.append(f"{where}: imports fastattn.{imported} directly "
                               "(load it through fastattn._extension)")
                elif f"fastattn.{imported}" not in mods and imported not in EXTENSIONS:
                    bad.append(f"{where}: imports {imported!r} from the package's __init__")
            elif target.split(".")[:2] in (["fastattn", e] for e in EXTENSIONS):
                bad.append(f"{where}: imports {target} directly")
            elif any(target == f"fastattn.{r}" or target.startswith(f"fastattn.{r}.")
                     for r in USER_ROOMS):
                bad.append(f"{where}: reaches up into the users' room {target}")
    return bad


def import_cycles(pkg_dir=PKG_DIR) -> list[list[str]]:
    """Circles among module-level imports of the modules below the API."""
    mods = _modules(pkg_dir)
    graph = {}
    for name, path in mods.items():
        if name == "fastattn" or _is_user_room(name):
            continue
        deps = set()
        for target, imported, top, _ in _imports(name, path, mods):
            if not top:
                continue
            sub = f"{target}.{imported}" if imported else target
            dep = sub if sub in mods else target
            # importing a submodule runs its parent packages' __init__ first
            parts = dep.split(".")
            for i in range(2, len(parts) + 1):
                d = ".".join(parts[:i])
                if d in mods and d != name and not _is_user_room(d) \
                        and not name.startswith(d + "."):  # a module's own parents are running
                    deps.add(d)
        graph[name] = deps
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    return cycles


def test_no_module_below_the_api_imports_the_package():
    bad = layering_violations()
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_circles_below_the_api():
    cycles = import_cycles()
    assert not cycles, "circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_checker_sees_a_violation(tmp_path):
    """The checker can fail: a below-API module importing the package is reported."""
    pkg = tmp_path / "fastattn"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .api import attention\n")
    (pkg / "api.py").write_text("from .backends import cpu\n")
    (pkg / "backends" / "__init__.py").write_text("")
    (pkg / "backends" / "cpu.py").write_text(
        "from .. import _C\nfrom .. import attention\nimport fastattn\nfrom .. import api\n")
    bad = layering_violations(str(pkg))
    assert len(bad) == 3, bad
    assert import_cycles(str(pkg)) == [["fastattn.api", "fastattn.backends.cpu", "fastattn.api"]] \
        or import_cycles(str(pkg))


if __name__ == "__main__":  # `python tests/test_layering.py [pkg_dir]`: print the counts
    d = sys.argv[1] if len(sys.argv) > 1 else PKG_DIR
    v, c = layering_violations(d), import_cycles(d)
    print("\n".join(v))
    print(f"{len(v)} imports against the layering, {len(c)} circles")
    for cyc in c:
        print("  circle:", " -> ".join(cyc))
