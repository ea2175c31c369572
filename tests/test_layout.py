"""The shape of the package a maintainer relies on: dependencies between its parts point one way, no
public constructor takes more than six positional values, and importing segnode changes nothing in
the libraries it uses."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segnode"
MAX_POSITIONAL = 6


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _unit(module: str) -> str:
    """segnode.jobs.queue -> segnode.jobs; segnode.flow -> segnode.flow (a top-level module is its own part)."""
    return ".".join(module.split(".")[:2])


def _imports(module: str, tree: ast.Module) -> set[str]:
    """Modules imported at run time (anywhere in the file, lazily or not; `if TYPE_CHECKING:` excluded)."""
    found: set[str] = set()
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            type_only.update(id(n) for child in node.body for n in ast.walk(child))
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("segnode"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("segnode"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from segnode import pipeline`
    return found


def import_graph() -> dict[str, set[str]]:
    """Part -> the parts it imports (segnode's subpackages and top-level modules)."""
    modules = _modules()
    graph: dict[str, set[str]] = {_unit(m): set() for m in modules}
    for name, tree in modules.items():
        for target in _imports(name, tree):
            while target not in modules and "." in target:  # `segnode.jobs.queue.enqueue` -> the module
                target = target.rsplit(".", 1)[0]
            if target in modules and _unit(target) != _unit(name) and _unit(target) != "segnode":
                graph[_unit(name)].add(_unit(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _positional(cls: ast.ClassDef) -> int | None:
    """How many values a caller may pass positionally to the class' constructor (None: not ours to count)."""
    bases = {ast.unparse(b) for b in cls.bases}
    if bases & {"BaseModel", "_Model", "_Strict", "Protocol", "NamedTuple", "StrEnum", "IntEnum", "Enum"} or any(
            b.endswith(("Error", "Exception")) for b in bases):
        return None
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            return len(item.args.posonlyargs) + len(item.args.args) - 1  # without self
    decorator = next((d for d in cls.decorator_list if "dataclass" in ast.unparse(d)), None)
    if decorator is None:
        return None
    if isinstance(decorator, ast.Call) and any(k.arg == "kw_only" and ast.unparse(k.value) == "True"
                                               for k in decorator.keywords):
        return 0
    count = 0
    for item in cls.body:
        if isinstance(item, ast.AnnAssign):
            annotation = ast.unparse(item.annotation)
            if annotation in ("KW_ONLY", "dataclasses.KW_ONLY"):
                break  # the fields after it are keyword-only
            count += "ClassVar" not in annotation
    return count


def test_dependencies_between_parts_point_one_way():
    graph = import_graph()
    assert "segnode.flow" in graph and "segnode.ingest" in graph  # the walk saw the package
    assert cycles(graph) == []


def test_the_hand_off_records_depend_on_nothing_of_segnode():
    assert import_graph()["segnode.flow"] == set()


def test_no_public_constructor_takes_more_than_six_positional_values():
    wide = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                count = _positional(node)
                if count is not None and count > MAX_POSITIONAL:
                    wide.append(f"{name}.{node.name}: {count}")
    assert wide == []


def test_importing_segnode_leaves_pynetdicom_and_pydicom_as_they_are():
    code = ("import pynetdicom._config as c, pynetdicom.transport as t; before = t.AssociationSocket._create_socket\n"
            "import pydicom.charset as cs; codec = cs.python_encoding['ISO 2022 IR 58']\n"
            "import segnode.cli, segnode.dicom.reader, segnode.delivery.send, segnode.ingest.ul, segnode.service\n"
            "assert c.LOG_REQUEST_IDENTIFIERS and t.AssociationSocket._create_socket is before\n"
            "assert cs.python_encoding['ISO 2022 IR 58'] == codec\n"
            "from segnode.delivery.dimse_client import configure_pynetdicom; configure_pynetdicom()\n"
            "assert not c.LOG_REQUEST_IDENTIFIERS and t.AssociationSocket._create_socket is not before\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_help_lists_no_hidden_command():
    run = subprocess.run([sys.executable, "-m", "segnode", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "SUPPRESS" not in run.stdout and "component" not in run.stdout


if __name__ == "__main__":  # python tests/test_layout.py: the graph, its cycles, the widest constructors
    graph = import_graph()
    for part in sorted(graph):
        print(f"{part:22s} -> {', '.join(sorted(graph[part])) or '-'}")
    print("cycles:", cycles(graph) or "none")
