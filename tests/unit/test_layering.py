"""Layering: which package may import what, checked on the source (`ast`, nothing is imported).

* the SDK (`client/balpm`) never imports the server (`balpm_server`);
* the numerical core (`balpm_server.acquisition`, `balpm_server.posterior`) knows nothing of
  gRPC, protobuf messages, the transport or the storage layer;
* `balpm_server.errors` (the typed errors every layer raises) does not import grpc: the
  mapping to status codes belongs to the transport;
* nothing outside `balpm_server.storage` talks to a database (SQL lives only there);
* no import cycles among `balpm_server` modules.

The forbidden-import rules look at every `import` / `from ... import` anywhere in a file
(inside functions and `if TYPE_CHECKING:` blocks too: a lazy import is still a dependency).
The cycle check uses only the imports that run when the module is imported: module level,
including `try` / `if` / class bodies, but not function bodies nor `if TYPE_CHECKING:` blocks.
An edge goes to the most specific module named (`from a.b import c` -> `a.b.c` if that is a
module, else `a.b`); the implicit import of parent packages is not an edge, so the common
"package `__init__` re-exports its submodules" pattern is not a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client"
SERVICE = ROOT / "service"

GRPC = ("grpc",)
TRANSPORT_FREE = ("grpc", "google.rpc", "balpm.v1", "balpm_server.transport", "balpm_server.storage")


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported and whether at import time."""

    module: str  # importing module, e.g. balpm_server.domain.service
    target: str  # a dotted name the statement imports, e.g. grpc.aio
    path: Path
    line: int
    at_import_time: bool

    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def module_name(path: Path, source_root: Path) -> str:
    """`service/balpm_server/domain/service.py` -> `balpm_server.domain.service` (packages: no `__init__`)."""
    parts = list(path.relative_to(source_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of a `from` import (relative ones resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    # In a package's __init__, `from . import x` is relative to the package itself.
    drop = node.level - 1 if is_package else node.level
    if drop > len(base):
        raise ValueError(f"relative import beyond the top-level package in {module}")
    anchor = base[: len(base) - drop]
    return ".".join([*anchor, node.module] if node.module else anchor)


def _names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The dotted names a statement imports: `from a import b` yields `a.b` (a module or a name in `a`)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = _resolve(module, is_package, node)
    for alias in node.names:
        yield base if alias.name == "*" else f"{base}.{alias.name}"


def imports_of(path: Path, source_root: Path) -> list[Import]:
    """All imports in `path`, each flagged with whether it runs at import time."""
    module = module_name(path, source_root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, at_import_time: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in _names(module, is_package, node):
                found.append(Import(module, name, path, node.lineno, at_import_time))
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            at_import_time = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import_time)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, at_import_time)

    visit(tree, True)
    return found


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(files: list[Path], source_root: Path, forbidden: tuple[str, ...]) -> list[str]:
    """`path:line module imports target` for each import of a forbidden name (one line per statement)."""
    out: dict[tuple[Path, int], str] = {}
    for path in files:
        for imp in imports_of(path, source_root):
            if _matches(imp.target, forbidden):
                out.setdefault((imp.path, imp.line), f"{imp.where()} {imp.module} imports {imp.target}")
    return [out[k] for k in sorted(out)]


def import_graph(source_root: Path = SERVICE, package: str = "balpm_server") -> dict[str, dict[str, str]]:
    """Module of `package` -> {imported module of `package`: where}, import-time imports only."""
    files = python_files(source_root / package)
    modules = {module_name(p, source_root) for p in files}
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for path in files:
        for imp in imports_of(path, source_root):
            if not imp.at_import_time:
                continue
            # The most specific module the name refers to (`a.b.c` may be a name in module `a.b`).
            target = imp.target
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != imp.module:
                graph[imp.module].setdefault(target, imp.where())
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def _describe(component: list[str], graph: dict[str, dict[str, str]]) -> str:
    members = set(component)
    edges = [
        f"    {a} -> {b} ({where})" for a in component for b, where in sorted(graph[a].items()) if b in members
    ]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


# ---- the rules --------------------------------------------------------------------------------------


def test_client_never_imports_the_server() -> None:
    found = violations(python_files(CLIENT / "balpm"), CLIENT, ("balpm_server",))
    assert not found, "the SDK must not depend on the server:\n" + "\n".join(found)


@pytest.mark.parametrize("package", ["acquisition", "posterior"])
def test_numerical_core_knows_no_transport_or_storage(package: str) -> None:
    found = violations(python_files(SERVICE / "balpm_server" / package), SERVICE, TRANSPORT_FREE)
    assert not found, f"balpm_server.{package} must not import {', '.join(TRANSPORT_FREE)}:\n" + "\n".join(found)


def test_errors_module_does_not_import_grpc() -> None:
    package = SERVICE / "balpm_server" / "errors"
    files = python_files(package) if package.is_dir() else [SERVICE / "balpm_server" / "errors.py"]
    found = violations(files, SERVICE, GRPC)
    assert not found, "balpm_server.errors must not import grpc (map to status codes in transport):\n" + "\n".join(
        found
    )


def test_sql_lives_only_under_storage() -> None:
    storage = SERVICE / "balpm_server" / "storage"
    files = [p for p in python_files(SERVICE / "balpm_server") if not p.is_relative_to(storage)]
    found = violations(files, SERVICE, ("sqlite3", "psycopg", "sqlalchemy"))
    assert not found, "only balpm_server.storage may talk to a database:\n" + "\n".join(found)


def test_no_import_cycles_in_the_server() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (module-level imports):\n" + "\n".join(_describe(c, graph) for c in found)


# ---- the checker itself ---------------------------------------------------------------------------


def test_checker_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import sub\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .. import other\n"
        "from ..sub import sibling as s\n"
        "if TYPE_CHECKING:\n"
        "    import grpc\n"
        "else:\n"
        "    import json\n"
        "class C:\n"
        "    import os\n"
        "def f():\n"
        "    from google.rpc import status_pb2\n"
    )
    got = {(i.target, i.at_import_time) for i in imports_of(pkg / "sub" / "mod.py", tmp_path)}
    assert got == {
        ("typing.TYPE_CHECKING", True),
        ("pkg.other", True),
        ("pkg.sub.sibling", True),
        ("grpc", False),
        ("json", True),
        ("os", True),
        ("google.rpc.status_pb2", False),
    }
    init = {i.target for i in imports_of(pkg / "__init__.py", tmp_path)}
    assert init == {"pkg.sub"}
    found = violations([pkg / "sub" / "mod.py"], tmp_path, ("grpc", "google.rpc"))
    assert [v.split(" ", 1)[1] for v in found] == [
        "pkg.sub.mod imports grpc",
        "pkg.sub.mod imports google.rpc.status_pb2",
    ]


def test_cycle_finder() -> None:
    graph = {"a": {"b": "x"}, "b": {"c": "x"}, "c": {"a": "x"}, "d": {"a": "x"}, "e": {}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b": "x"}, "b": {}}) == []


def test_cycles_come_from_import_time_imports_only(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import A\n")  # re-export: not a cycle with pkg.a
    (pkg / "a.py").write_text("import pkg\nfrom pkg import b\nA = 1\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "c.py").write_text("def f():\n    from pkg import a\n")
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg", "pkg.a"]]  # `import pkg` names the package
    (pkg / "a.py").write_text("from pkg import b\nA = 1\n")
    assert cycles(import_graph(tmp_path, "pkg")) == []
    (pkg / "b.py").write_text("try:\n    from pkg.a import A\nexcept ImportError:\n    A = None\n")
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert "pkg.a -> pkg.b (" in _describe(["pkg.a", "pkg.b"], graph)
