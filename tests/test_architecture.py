"""The shape of the code: imports point down the layers of docs/guide.md ("Where things live"),
analysis stays pure, and no function grows past ~80 lines. Every import counts, also one inside a
function."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "critbatch"

# lowest first; a module may import its own layer and the ones below it
LAYERS = [
    ("ground", ["critbatch.errors", "critbatch.units", "critbatch.config", "critbatch.io", "critbatch.dist",
                "critbatch.perf", "critbatch.version", "critbatch.records", "critbatch.registry",
                "critbatch.progress"]),
    ("engine", ["critbatch.model", "critbatch.optim", "critbatch.data", "critbatch.schedules", "critbatch.presets"]),
    ("train", ["critbatch.train", "critbatch.gns.estimators", "critbatch.gns.probe", "critbatch.gns.online",
               "critbatch.gns.__init__"]),
    ("launch", ["critbatch.launch"]),
    ("analysis", ["critbatch.analysis"]),
    ("report", ["critbatch.report"]),
    ("pipelines", ["critbatch.branch", "critbatch.closed_loop", "critbatch.warmup", "critbatch.transfer", "critbatch.demo",
                   "critbatch.gns.checkpoints",
                   # deprecated import paths, kept for one release
                   "critbatch.compare", "critbatch.derive", "critbatch.autobatch", "critbatch.plan"]),
    ("integrations", ["critbatch.integrations"]),
    ("cli", ["critbatch.cli", "critbatch.clispec", "critbatch.__main__", "critbatch.__init__"]),
]


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it")
    return rank


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts)


def imports(path: Path) -> list[tuple[str, int]]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported critbatch module, line) for every import in ``source``, resolved to absolute names;
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    pkg = module.removesuffix(".__init__") if is_package else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "critbatch"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "critbatch":
                continue
            for a in node.names:
                sub = Path(*f"{target}.{a.name}".split("."))
                is_module = (SRC.parent / sub).with_suffix(".py").is_file() or (SRC.parent / sub).is_dir()
                out.append((f"{target}.{a.name}" if is_module else target, node.lineno))
    return out


def layer_of_import(target: str) -> int:
    if (SRC.parent / Path(*target.split("."))).is_dir():
        target += ".__init__"
    return layer_of(target)


FILES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_point_down_the_layers(path):
    mine = layer_of(module_name(path))
    bad = [f"{path.relative_to(SRC)}:{line} imports {t} ({LAYERS[layer_of_import(t)][0]} is above {LAYERS[mine][0]})"
           for t, line in imports(path) if layer_of_import(t) > mine]
    assert not bad, "\n".join(bad)


def test_analysis_is_pure():
    """Decisions, intervals, fits and schedule derivation: numbers in, numbers out — no torch, no
    plotting, no files."""
    for path in (SRC / "analysis").glob("*.py"):
        third = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                third |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                third.add((node.module or "").split(".")[0])
        assert not third & {"torch", "matplotlib", "pathlib", "os", "shutil", "tempfile"}, (path.name, third)
        assert not {t for t, _ in imports(path)} & {"critbatch.io", "critbatch.report"}, path.name


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_function_over_80_lines(path):
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{path.relative_to(SRC)}: {', '.join(long)}"


def test_the_layer_test_catches_an_upward_import():
    """The checker itself: relative imports resolve, and an upward one is flagged."""
    src = "from ..report.plots import save\nfrom .decision import decide\nfrom .. import presets\n"
    found = dict(imports_of(src, "critbatch.analysis.x"))
    assert set(found) == {"critbatch.report.plots", "critbatch.analysis.decision", "critbatch.presets"}
    here = layer_of("critbatch.analysis.x")
    assert layer_of_import("critbatch.report.plots") > here >= layer_of_import("critbatch.presets")


def test_help_and_docstrings_cite_what_ships():
    """Every `X.md §N` cited in the code names a page in docs/ and a section it has."""
    import re

    docs = SRC.parent.parent / "docs"
    cited = []
    for path in FILES:
        for name, sec in re.findall(r"(?:docs/|\b)(method|design|guide|LOG|scale-out)\.md(?:[ ,]+§(\d+))?",
                                    path.read_text()):
            page = docs / f"{name}.md"
            assert page.is_file(), f"{path.relative_to(SRC)} cites {name}.md, which does not ship"
            if sec:
                assert re.search(rf"^#+ §{sec}\b", page.read_text(), re.M), f"{path.relative_to(SRC)}: {name}.md §{sec}"
            cited.append(name)
    assert "method" in cited


def private_reaches(source: str, module: str, is_package: bool = False) -> list[str]:
    """``from X import _name`` (and ``X._name`` on a module bound by an import) where X lies in
    another package than ``module``: a private name used across a package boundary. Modules at the
    root of critbatch are each a package of their own."""
    pkg = module.removesuffix(".__init__") if is_package else module.rsplit(".", 1)[0]

    def package_of(target: str) -> str:
        if (SRC.parent / Path(*target.split("."))).is_dir():
            return target
        parent = target.rsplit(".", 1)[0]
        return target if parent == "critbatch" else parent

    mine = pkg if pkg != "critbatch" else module
    out, bound = [], {}
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            target = (".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
                      if node.level else (node.module or ""))
            if target.split(".")[0] != "critbatch":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (SRC.parent / Path(*sub.split("."))).is_dir():
                    bound[a.asname or a.name] = sub
                elif a.name.startswith("_") and not a.name.startswith("__") and package_of(target) != mine:
                    out.append(f"line {node.lineno}: {target}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "critbatch":
                    bound[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and package_of(bound[node.value.id]) != mine):
            out.append(f"line {node.lineno}: {bound[node.value.id]}.{node.attr}")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_private_names_across_packages(path):
    bad = private_reaches(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not bad, f"{path.relative_to(SRC)} reaches into another package's private names: {'; '.join(bad)}"


def test_the_private_name_check_catches_a_reach_across_packages():
    src = ("from ..branch.plan import _read_parent\nfrom .policy import _helper\nfrom ..branch import plan as p\n"
           "x = p._check_options\nfrom ..config import option\n")
    found = private_reaches(src, "critbatch.closed_loop.loop")
    assert found == ["line 1: critbatch.branch.plan._read_parent", "line 4: critbatch.branch.plan._check_options"]
    assert private_reaches("from .plan import _read_parent\n", "critbatch.branch.run") == []  # its own package


def test_the_closed_loop_uses_only_the_public_sweep_api():
    import critbatch.branch as branch

    for path in (SRC / "closed_loop").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and (node.module or "").startswith("branch"):
                assert node.module == "branch", f"{path.name} imports critbatch.{node.module}: use critbatch.branch"
                assert {a.name for a in node.names} <= set(branch.__all__), path.name


def test_no_module_over_600_lines():
    long = [f"{p.relative_to(SRC)} ({n} lines)" for p in FILES if (n := len(p.read_text().splitlines())) > 600]
    assert not long, ", ".join(long)


def test_the_old_import_paths_still_work_for_one_release():
    from critbatch.autobatch import AutoBatchConfig, run_auto_batch
    from critbatch.branch.sweep import branch_losses, branch_spec, describe_point, run_sweep
    from critbatch.compare import CompareConfig, run_compare
    from critbatch.derive import ScheduleConfig, write_schedule
    from critbatch.plan import PlanConfig, estimate

    import critbatch.branch as branch
    import critbatch.closed_loop as closed_loop
    import critbatch.warmup as warmup

    assert run_sweep is branch.run_sweep and branch_spec is branch.branch_spec and describe_point is branch.describe_point
    assert branch_losses is branch.branch_outcome
    assert run_auto_batch is closed_loop.run_auto_batch and AutoBatchConfig is closed_loop.AutoBatchConfig
    assert estimate is closed_loop.estimate and PlanConfig is closed_loop.PlanConfig
    assert run_compare is warmup.run_compare and CompareConfig is warmup.CompareConfig
    assert write_schedule is warmup.write_schedule and ScheduleConfig is warmup.ScheduleConfig
