"""The package layout stays as docs/ARCHITECTURE.md draws it: imports run one way, down the layers named
there, with no cycles; the engine's own modules are never imported inside functions (only heavy optional
third-party packages are, each with a comment); no module imports another's private names; files stay under
400 lines and engine functions under 40; public entry points spell out their parameters; and the diagram
and the path of a prompt in the document are the code's (this test fails when they go stale)."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fewstep"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
SUBPACKAGES = ("models", "loading", "samplers", "speed", "inspect", "bench", "shapes", "train", "serve", "batch",
               "scoring")
# Third-party packages that may be imported inside a function: optional or heavy, needed by few paths.
LAZY_ALLOWED = ("diffusers", "transformers", "torchao", "accelerate", "matplotlib", "huggingface_hub", "peft",
                "uvicorn", "torchmetrics", "cv2", "torch._dynamo", "torch._functorch", "torch._inductor")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The architecture's unit of a module: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in SUBPACKAGES else module


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in MODULES.items()}


def imports(module: str):
    """(target module, imported names, node, inside a function?) for every import of `module`."""
    tree, path = TREES[module], MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            if node.module is None:  # `from . import x`: x is a module
                for name in names:
                    yield f"{target}.{name}", [], node, id(node) not in top
            else:
                yield target, names, node, id(node) not in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node, id(node) not in top


def own(target: str) -> str | None:
    """The fewstep module a target names (a module, or a name inside one), else None."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def module_graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, names, _, _ in imports(m):
            if target.split(".")[0] != "fewstep":
                continue
            found = {own(f"{target}.{n}") for n in names} if names else {own(target)}
            graph[m] |= {t for t in found if t and t != m}
    return graph


def layers() -> dict[str, int]:
    """The documented layers: the table rows `| N | `unit`, `unit` | ... |` of docs/ARCHITECTURE.md."""
    ranks = {}
    for rank, cells in re.findall(r"^\| (\d+) \| ([^|]+)\|", DOC.read_text(encoding="utf-8"), re.M):
        for name in re.findall(r"`([\w.]+)`", cells):
            ranks[name] = int(rank)
    return ranks


def test_every_unit_has_a_layer_and_imports_only_go_down():
    ranks, graph = layers(), module_graph()
    units = {unit(m) for m in MODULES}
    assert units <= ranks.keys(), f"units missing from docs/ARCHITECTURE.md's layer table: {sorted(units - ranks.keys())}"
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   if unit(m) != unit(t) and ranks[unit(t)] >= ranks[unit(m)])
    assert not wrong, "imports that do not go down the layers: " + "; ".join(wrong)


def test_no_import_cycles():
    graph, state, cycles = module_graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def commented(lines: list[str], node: ast.stmt) -> bool:
    """Whether an import says why it is lazy: a comment on its line, on a line of the run of imports it
    belongs to, or on the line just above that run (a comment or a commented `try:`)."""
    i = node.lineno - 1
    while True:
        line = lines[i].strip()
        if "#" in line:
            return True
        if i == 0 or not lines[i - 1].strip().startswith(("import ", "from ", "#", "try:")):
            return False
        i -= 1


def test_function_level_imports_are_only_heavy_optional_packages_with_a_comment():
    found = []
    for m, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, _, node, nested in imports(m):
            if not nested:
                continue
            if target.split(".")[0] == "fewstep" or not target.startswith(LAZY_ALLOWED) or not commented(lines, node):
                found.append(f"{m}:{node.lineno} {target}")
    assert not found, f"function-level imports that should be at the top: {found}"


def test_no_module_imports_anothers_private_names():
    found = []
    for m in MODULES:
        aliases = {}
        for target, names, node, _ in imports(m):
            if target.split(".")[0] != "fewstep":
                continue
            found += [f"{m}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
            for a in node.names:
                if own(f"{target}.{a.name}") == f"{target}.{a.name}" or own(target) == target and not names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(TREES[m]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{m}: {node.value.id}.{node.attr}")
    assert not found, f"private names used across modules: {found}"


def test_sizes_of_files_and_engine_functions():
    long_files = [f"{m} ({len(p.read_text().splitlines())})" for m, p in MODULES.items()
                  if len(p.read_text().splitlines()) > 400]
    assert not long_files, f"files over 400 lines: {long_files}"
    long_functions = [f"{m}.{n.name} ({n.end_lineno - n.lineno + 1})" for m, tree in TREES.items()
                      if unit(m) != "fewstep.train" for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 40]
    assert not long_functions, f"engine functions over 40 lines: {long_functions}"


@pytest.mark.parametrize("entry", ["fewstep.load", "fewstep.load_autoencoder", "fewstep.Pipeline.__call__",
                                   "fewstep.Pipeline.generate", "fewstep.request.resolve"])
def test_public_entry_points_spell_out_their_parameters(entry):
    obj = resolve(entry)
    kinds = {p.kind for p in inspect.signature(obj).parameters.values()}
    assert not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}, entry


def resolve(dotted: str):
    """`fewstep.x.y.Name.attr` -> the object (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def reduced_unit_graph() -> set[tuple[str, str]]:
    """The unit-level import graph with every edge implied by a longer path removed (transitive reduction)."""
    edges = {(unit(m), unit(t)) for m, targets in module_graph().items() for t in targets if unit(m) != unit(t)}
    succ = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)

    def reachable(a, skip):
        seen, todo = set(), [n for n in succ.get(a, ()) if (a, n) != skip]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += succ.get(n, ())
        return seen
    return {(a, b) for a, b in edges if b not in reachable(a, (a, b))}


def mermaid() -> str:
    short = lambda u: u.removeprefix("fewstep.") if u != "fewstep" else "fewstep"  # noqa: E731
    lines = [f"    {short(a)} --> {short(b)}" for a, b in sorted(reduced_unit_graph())]
    return "```mermaid\nflowchart TD\n" + "\n".join(lines) + "\n```"


def test_the_diagram_is_the_code():
    text = DOC.read_text(encoding="utf-8")
    want = mermaid()
    assert want in text, f"docs/ARCHITECTURE.md's diagram is stale; the imports now give:\n{want}"


def test_the_path_of_a_prompt_names_real_functions():
    text = DOC.read_text(encoding="utf-8")
    path = text.split("## The path of one prompt", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"`(fewstep\.[\w.]+)`", path)
    assert len(names) >= 15
    for name in names:
        resolve(name)  # raises if the document names something that no longer exists
