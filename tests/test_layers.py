"""The package's floors hold: no import cycle inside ``normscore/``, every module imports only its
own floor or the floors below, and scoring never loads the tool packages.

The graph is read statically (``ast``) from ``normscore/**/*.py``: ``import a.b`` and ``from a
import b`` (relative ones resolved) add an edge to the module and, when ``b`` is a submodule, to
it. Module-level imports (``if TYPE_CHECKING:`` blocks excluded) must form an acyclic graph.
Imports inside functions run later, so they cannot fail an import, but one that closes a cycle
is usually a cycle dodged rather than removed: each such import is listed in ``LOCAL_CYCLES``
with its reason, and a new one fails the test. Importing a submodule also runs its parents'
``__init__``; those implicit edges are left out (a package ``__init__`` is a facade that imports
its children)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "normscore"

#: floors, lowest first; a module may import modules of its own floor or lower ones
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "core",
        (
            "normscore._version",
            "normscore.errors",
            "normscore.runmode",
            "normscore.progress",
            "normscore.stats",
            "normscore.metrics",
            "normscore.adapters",
            "normscore.taps",
            "normscore.stream",
            "normscore.fingerprint",
            "normscore.files",
            "normscore.hashing",
            "normscore.io",
            "normscore.preprocess",
        ),
    ),
    ("detectors", ("normscore.detectors",)),
    ("public api", ("normscore", "normscore.pipeline", "normscore.select", "normscore.pseudo_ood")),
    ("tools", ("normscore.tools", "normscore.models", "normscore.training")),
    ("data", ("normscore.data",)),
    ("bench / finetune", ("normscore.bench", "normscore.finetune", "normscore.demo")),
)

#: function-local imports that close a cycle: (importer, imported) -> why it is there. None left:
#: the detector registry no longer imports the families on its first lookup (the package
#: ``__init__`` registers them; see normscore/detectors/registry.py).
LOCAL_CYCLES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs at import time (module level)."""

    def walk(nodes: list[ast.stmt], top: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for n in nodes:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                yield n, top
            elif isinstance(n, ast.If) and _is_type_checking(n):
                continue
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(n.body, False)
            elif isinstance(n, ast.ClassDef):
                yield from walk(n.body, top)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    yield from walk(getattr(n, field, []) or [], top)

    yield from walk(tree.body, True)


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_pkg: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level:
        base = importer.split(".") if is_pkg else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
    names_only = len(subs) < len(node.names)  # some imported name is an attribute of ``mod``
    return subs | ({mod} if mod in known and names_only else set())


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(module_level, function_local)`` edges between normscore modules."""
    mods = _modules()
    known = set(mods)
    top: dict[str, set[str]] = {m: set() for m in mods}
    local: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, at_top in _imports(tree):
            (top if at_top else local)[m] |= _targets(node, m, path.name == "__init__.py", known) - {m}
    # the one dynamic import: detectors/_all.py imports each family by name
    from normscore.detectors import _all

    top["normscore.detectors._all"] |= {f"normscore.detectors.{n}" for n in _all._MODULES}
    return top, local


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return [*stack[stack.index(v) :], v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def _reaches(graph: dict[str, set[str]], src: str, dst: str) -> bool:
    seen, todo = set(), [src]
    while todo:
        u = todo.pop()
        if u == dst:
            return True
        if u not in seen:
            seen.add(u)
            todo.extend(graph.get(u, ()))
    return False


def _floor(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


# ---------------------------------------------------------------------------------------------


def test_the_graph_sees_the_imports_it_should():
    """The guard reads what it claims to read (a broken parser would pass every check below)."""
    top, local = import_graph()
    assert {"normscore.adapters", "normscore.errors", "normscore.runmode"} <= top["normscore.taps"]
    assert "normscore.detectors.engines.persample" in top["normscore.detectors.ldg"]  # relative, nested
    assert "normscore.tools.trainer" in local["normscore.bench.models"]  # from ..tools import trainer
    assert "normscore.detectors.logits" in top["normscore.detectors._all"]  # the dynamic one
    assert "normscore.bench.runner" not in top["normscore.bench.cli"]  # under TYPE_CHECKING / in functions
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_at_module_level():
    top, _ = import_graph()
    assert _cycle(top) is None, " -> ".join(_cycle(top) or [])


def test_function_local_imports_do_not_hide_new_cycles():
    """A function-local import from ``a`` to ``b`` where ``b`` already reaches ``a`` is a cycle
    dodged; only the ones listed in ``LOCAL_CYCLES`` (each with its reason) may exist."""
    top, local = import_graph()
    both = {m: top[m] | local[m] for m in top}
    found = {(a, b) for a, bs in local.items() for b in bs if _reaches(both, b, a)}
    assert found <= set(LOCAL_CYCLES), (
        f"new function-local imports that close a cycle: {sorted(found - set(LOCAL_CYCLES))}"
    )
    assert set(LOCAL_CYCLES) <= found, f"gone (remove from LOCAL_CYCLES): {sorted(set(LOCAL_CYCLES) - found)}"


def test_every_module_has_a_floor_and_imports_only_its_floor_or_below():
    top, local = import_graph()
    unplaced = sorted(m for m in top if _floor(m) < 0)
    assert not unplaced, f"modules without a floor in FLOORS: {unplaced}"
    bad = [
        f"{a} ({FLOORS[_floor(a)][0]}) imports {b} ({FLOORS[_floor(b)][0]})"
        for a in sorted(top)
        for b in sorted(top[a] | local[a])
        if _floor(b) > _floor(a)
    ]
    assert not bad, "\n".join(bad)


SCORING = """
import sys
import torch
from torch import nn
import normscore

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    nn.Linear(16, 4),
)
x = torch.randn(160, 3, 16, 16)
loader = [(x[i : i + 16], torch.arange(16) % 4) for i in range(0, 160, 16)]
small = {"knn": {"k": 3}, "nnguide": {"k": 3, "alpha": 1.0}, "mcd": {"where": "head", "samples": 5}}
dets = [normscore.create(n, **small.get(n, {})) for n in normscore.list_detectors() if n != "fusion"]
dset = normscore.DetectorSet(dets).fit(model, loader)
for det in [dset, normscore.create("mahalanobis").fit(model, loader)]:
    det.score(x[:4])
    det.save(sys.argv[1])
    normscore.load(sys.argv[1], model).score(x[:4])
    normscore.ScoringModule(model, det)(x[:4])
normscore.score_loader(det, loader)
normscore.evaluate(torch.rand(8), torch.rand(8))
print(" ".join(sorted(m for m in sys.modules if m.startswith("normscore"))))
"""


@pytest.mark.timeout(600)
def test_scoring_never_loads_bench_finetune_data_or_tools(tmp_path):
    """Fitting every detector, scoring, saving, loading and the scoring module load none of the
    tool packages (checked in a fresh process, where nothing else imported them)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run(
        [sys.executable, "-c", SCORING, str(tmp_path / "d.ns")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = r.stdout.split()
    assert "normscore.detectors.ldg" in loaded and "normscore.pipeline" in loaded  # the path ran
    tools = (
        "normscore.bench",
        "normscore.finetune",
        "normscore.data",
        "normscore.tools",
        "normscore.models",
        "normscore.training",
    )
    leaked = [m for m in loaded if m in tools or m.startswith(tuple(t + "." for t in tools))]
    assert not leaked, leaked


# ---------------------------------------------------------------------------------------------
# owners of private knowledge: the feature-key format (taps), views and reductions (taps), the
# model's module table (adapters)


def _is_block_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.startswith("block:")
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        return isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("block:")
    return False


def _splits_on_key_separator(node: ast.AST) -> bool:
    """``k.split("|")``-style parsing of a view key or ``"|" in k``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in ("split", "rsplit", "partition", "rpartition") and node.args:
            a = node.args[0]
            return isinstance(a, ast.Constant) and a.value == "|"
    if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and node.left.value == "|":
        return any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
    return False


def leaks(source: str, module: str) -> list[str]:
    """Feature-key building/parsing outside taps and private ``_VIEWS`` / ``_REDUCTIONS`` /
    ``_modules`` / ``_root`` access outside their owners, as ``"line: what"``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if module != "normscore.taps":
            if _is_block_literal(node):
                found.add(f"{line}: builds or parses a 'block:' key (use taps.block_key / taps.parse_key)")
            if _splits_on_key_separator(node):
                found.add(f"{line}: parses a '<view>|<key>' key (use taps.parse_key)")
        if isinstance(node, ast.Attribute):
            if node.attr in ("_VIEWS", "_REDUCTIONS") and module != "normscore.taps":
                found.add(f"{line}: reads taps.{node.attr} (use taps.get_view / taps.reduce_block)")
            if node.attr in ("_modules", "_root") and module != "normscore.adapters":
                found.add(f"{line}: reads Adapter.{node.attr} (use adapter.module(name) / adapter.root)")
    return sorted(found)


def test_the_leak_guard_sees_leaks():
    bad = """
k = f"block:{name}:{red}"
if key.startswith("block:"): pass
view, _, base = key.partition("|")
ok = "|" in key
fn = taps._VIEWS.get(v)
m = adapter._modules[name]
r = adapter._root
"""
    assert len(leaks(bad, "normscore.bench.cache")) == 7
    assert leaks('name, _, arg = given.partition(":")\nk = block_key(n, r)', "normscore.tools.model_names") == []


def test_feature_keys_views_and_module_tables_have_one_owner():
    """Only taps builds and parses feature keys and reads its registries; only the adapter
    reads its module table (issue 13, item 6)."""
    bad = [f"{p.relative_to(ROOT)}:{hit}" for m, p in _modules().items() for hit in leaks(p.read_text(), m)]
    assert not bad, "\n".join(bad)


def test_every_family_is_registered_before_any_lookup():
    """The registry never imports the families (that closed a cycle): the package ``__init__``
    does. In a fresh process, the first lookup already sees every built-in family."""
    code = (
        "from normscore.detectors.registry import list_detectors\n"
        "names = list_detectors()\n"
        "import inspect, importlib\n"
        "from normscore.detectors import _all\n"
        "from normscore.detectors.base import Detector\n"
        "mods = [importlib.import_module('normscore.detectors.' + m) for m in _all._MODULES]\n"
        "want = {c.name for m in mods for _, c in inspect.getmembers(m, inspect.isclass)\n"
        "        if issubclass(c, Detector) and c.__module__ == m.__name__ and c.name}\n"
        "assert want and want <= set(names), sorted(want - set(names))\n"
        "print(len(names))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) >= 20


#: the detector machinery that may make distributed calls: the fit passes and the declared-state sync
DIST_MACHINERY = {"normscore.detectors.fitting", "normscore.detectors.sync"}
_DIST_NAME = re.compile(r"^(all_reduce\w*|all_gather\w*|distributed_active|reduce_scatter\w*|broadcast)$")


def dist_calls(source: str) -> list[str]:
    """Distributed primitives a module uses: ``all_reduce*`` / ``all_gather*`` names or methods,
    ``distributed_active`` and any ``torch.distributed`` reference (docstrings do not count)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name) and _DIST_NAME.match(node.id):
            found.add(f"{line}: {node.id}")
        elif isinstance(node, ast.Attribute) and (
            _DIST_NAME.match(node.attr) or (node.attr == "distributed" and ast.unparse(node.value) == "torch")
        ):
            found.add(f"{line}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if (node.module or "").endswith("distributed") or any(_DIST_NAME.match(n) for n in names):
                found.add(f"{line}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import) and any("distributed" in a.name for a in node.names):
            found.add(f"{line}: import {', '.join(a.name for a in node.names)}")
    return sorted(found)


def test_the_distributed_guard_sees_calls():
    bad = """
import torch.distributed as dist
from ..stats import all_reduce_sum, all_gather_cat
from torch.distributed import all_reduce
all_reduce_sum(x, y)
b = all_gather_cat(b)
m.all_reduce()
s.all_gather()
if torch.distributed.is_initialized(): pass
"""
    assert {int(h.split(":")[0]) for h in dist_calls(bad)} == set(range(2, 10))  # every line is caught
    ok = '"""Summed over ranks under ``torch.distributed`` (``all_reduce``)."""\n_fit_state = (("_sums", "sum"),)\n'
    assert dist_calls(ok) == []


def test_detector_families_make_no_distributed_calls():
    """Fit state declares its reduction (``Detector._fit_state``) and the base synchronises it once
    (:mod:`normscore.detectors.sync`); detector family files contain no distributed calls (issue
    13, item 5). ``detectors/engines/subspace.py`` keeps the collective matmuls of its streamed
    randomized subspace iteration (an engine algorithm, rows sharded over ranks)."""
    fams = {m: p for m, p in _modules().items() if m.startswith("normscore.detectors.") and ".engines" not in m}
    assert "normscore.detectors.distances" in fams and "normscore.detectors.ldg" in fams
    bad = [
        f"{p.relative_to(ROOT)}:{hit}"
        for m, p in fams.items()
        if m not in DIST_MACHINERY
        for hit in dist_calls(p.read_text())
    ]
    assert not bad, "\n".join(bad)


#: the one place that knows model structure and attaches hooks (timm's ``_features.py`` role)
HOOK_OWNERS = {"normscore.adapters", "normscore.taps"}
_HOOK_CALL = re.compile(r"\.register_(forward_pre_hook|forward_hook|full_backward_hook|backward_hook)\(")


def test_only_the_adapter_and_taps_attach_hooks():
    """Hooks on the user's model are attached in one place: the adapter's probe and the taps'
    captures (issue 13, item 7). Engines, detectors, bench and finetune ask them."""
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for m, p in _modules().items()
        if m not in HOOK_OWNERS
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if _HOOK_CALL.search(line)
    ]
    assert not bad, "\n".join(bad)
    assert _HOOK_CALL.search("h = m.register_forward_pre_hook(fn)")
