"""The package layout: imports point one way (down the layers below), no cycles, no private names across packages."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "hf_attn_swap"
#: each top-level part of the package and the layer it sits on; a module may import only from lower layers (and
#: from its own part). cli -> pipeline -> uptrain / evaluate / export -> methods -> adapters -> modeling -> io.
LAYERS = {
    "versions": 0,
    "io": 1,
    "modeling": 2,
    "adapters": 3,
    "methods": 4,
    "testing": 5,
    "export": 5,
    "evaluate": 5,
    "uptrain": 6,
    "pipeline": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 9,
}


def part_of(module: str) -> str:
    """'hf_attn_swap.methods.gqa.fit' -> 'methods'; the package itself -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every hf_attn_swap import in ``path`` (function-level ones too)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "hf_attn_swap":
                names = [alias.name for alias in node.names]
                submodules = [n for n in names if is_module(f"{module}.{n}")]  # from pkg import submodule
                found += [(f"{module}.{n}", []) for n in submodules]
                if len(submodules) < len(names):
                    found.append((module, [n for n in names if n not in submodules]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "hf_attn_swap"]
    return found


def is_module(module: str) -> bool:
    path = REPO_ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_part_has_a_layer():
    parts = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in package_files()}
    assert parts == set(LAYERS), (
        f"place {sorted(parts - set(LAYERS))} in LAYERS (and the README's Architecture)"
    )


def test_imports_only_point_down():
    wrong = []
    for path in package_files():
        source = part_of(module_name(path))
        for module, names in imports(path):
            targets = [module] if module != "hf_attn_swap" else [f"hf_attn_swap.{n}" for n in names]
            for target in targets:
                part = part_of(target)
                if part != source and LAYERS[part] >= LAYERS[source]:
                    wrong.append(f"{path.relative_to(REPO_ROOT)} ({source}) imports {target} ({part})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph = {module_name(p): {m for m, _ in imports(p)} for p in package_files()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # importing a package runs its __init__: an edge into a package's own submodule is not a cycle
            if nxt not in graph or nxt == node or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_private_names_imported_across_packages():
    wrong = []
    for path in package_files():
        source_package = (
            module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
        )
        for module, names in imports(path):
            target_package = module.rsplit(".", 1)[0]
            for name in names:
                if name.startswith("_") and target_package != source_package and module != source_package:
                    wrong.append(f"{path.relative_to(REPO_ROOT)} imports {module}.{name}")
    assert not wrong, "\n".join(wrong)


def test_the_layout_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: an io module importing methods is reported."""
    fake = PACKAGE / "io" / "_layout_probe.py"
    fake.write_text("from ..methods.report import ConversionReport\n")
    try:
        try:
            test_imports_only_point_down()
        except AssertionError as err:
            assert "io/_layout_probe.py (io) imports hf_attn_swap.methods.report (methods)" in str(err)
        else:
            raise AssertionError("an upward import was not reported")
    finally:
        fake.unlink()


#: where the size rules hold (the rooms the conversions, exports and pipeline live in)
SIZED_PARTS = ("methods", "export", "pipeline")
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8


def sized_functions():
    """(path, qualified name, lines, parameters) of every function in ``SIZED_PARTS`` (``self``/``cls`` and
    ``*args``/``**kwargs`` not counted as parameters)."""
    import hf_attn_swap

    public = set(hf_attn_swap.__all__)
    found = []
    for path in package_files():
        if path.relative_to(PACKAGE).parts[0] not in SIZED_PARTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                count = len([n for n in names if n not in ("self", "cls")])
                found.append((path, node.name, node.end_lineno - node.lineno + 1, count, node.name in public))
    return found


def test_functions_fit_a_screen():
    """No function in methods/, export/ or pipeline/ is longer than 80 lines (docstring included)."""
    long = [f"{p.relative_to(REPO_ROOT)}:{name} ({lines} lines)" for p, name, lines, _, _ in sized_functions()
            if lines > MAX_FUNCTION_LINES]  # fmt: skip
    assert not long, "split these (<= 80 lines each):\n" + "\n".join(long)


def test_functions_take_few_parameters():
    """More than 8 parameters asks for an options object, except in the public API (``hf_attn_swap.__all__``),
    whose keyword options users type."""
    many = [f"{p.relative_to(REPO_ROOT)}:{name} ({count} parameters)" for p, name, _, count, public in sized_functions()
            if count > MAX_PARAMETERS and not public]  # fmt: skip
    assert not many, "take an options object instead:\n" + "\n".join(many)


def test_the_size_checks_catch_a_long_function(monkeypatch):
    """The two checks above can fail: a 90-line function with 9 parameters in pipeline/ is reported by both."""
    body = "\n".join(f"    x{i} = {i}" for i in range(89))
    fake = PACKAGE / "pipeline" / "_size_probe.py"
    fake.write_text(f"def probe(a, b, c, d, e, f, g, h, i):\n{body}\n")
    try:
        for check, expected in (
            (test_functions_fit_a_screen, "(90 lines)"),
            (test_functions_take_few_parameters, "(9 parameters)"),
        ):
            try:
                check()
            except AssertionError as err:
                assert "pipeline/_size_probe.py:probe " + expected in str(err)
            else:
                raise AssertionError(f"{check.__name__} did not report the probe")
    finally:
        fake.unlink()
