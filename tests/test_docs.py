"""Docs are code: every ```python block of README.md and docs/**/*.md runs as written.

The blocks of one page run in order in one namespace - as a reader would paste them into one
session - in a process of their own (forked from a runner that has imported torch and timm once),
with a fresh working directory and cache folder and fixed seeds. Tracebacks point at the page
and its line. Every fenced block names its language, so no Python hides in an untagged block;
shell commands are ```sh, program output is ```text. The complete programs in docs/examples/
are run by tests/test_pipeline.py.

By hand: ``python tests/test_docs.py docs/quickstart.md [more pages]``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python", "sh", "text"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, line of the first code line (1-based), code)`` of every fenced block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip().strip(fence[0])
        ):
            j += 1
        body = lines[i + 1 : j]
        if indent:  # a block inside a list item: remove the item's indentation
            body = [ln[indent:] if ln[:indent].isspace() else ln.lstrip() for ln in body]
        blocks.append((m["info"], i + 2, "\n".join(body)))
        i = j + 1
    return blocks


def python_blocks(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for lang, line, code in fenced_blocks(page.read_text()) if lang == "python"]


def _name(page: Path) -> str:
    page = page.resolve()
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_page(page: Path, work: Path) -> dict:
    """Run the page's Python blocks in order in one namespace, in ``work``; the result record."""
    import random

    import numpy as np
    import torch

    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ.update(NORMSCORE_CACHE_DIR=str(work / "cache"), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__main__"}
    record: dict = {"page": _name(page), "blocks": [], "error": None}
    t_page = time.perf_counter()
    for line, code in python_blocks(page):
        t0 = time.perf_counter()
        try:
            exec(compile("\n" * (line - 1) + code, _name(page), "exec"), namespace)
        except BaseException:
            record["error"] = f"the block at {_name(page)}:{line} failed:\n{traceback.format_exc()}"
            break
        finally:
            record["blocks"].append([line, round(time.perf_counter() - t0, 3)])
    record["seconds"] = round(time.perf_counter() - t_page, 3)
    return record


def run_pages(pages: list[Path], out: Path) -> list[dict]:
    """Run each page in a forked child (fresh module state, libraries already imported)."""
    import numpy  # noqa: F401 - imported once here, inherited by every page's process
    import timm  # noqa: F401
    import torch  # noqa: F401

    import normscore  # noqa: F401

    records = []
    for i, page in enumerate(pages):
        result = out / f"page{i}.json"
        if hasattr(os, "fork"):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: run, write the record, leave without cleanup handlers
                code = 1
                try:
                    rec = run_page(page, out / f"work{i}")
                    result.write_text(json.dumps(rec))
                    code = 0 if rec["error"] is None else 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            os.waitpid(pid, 0)
        else:  # no fork (Windows): same interpreter, fresh namespace
            cwd = os.getcwd()
            try:
                result.write_text(json.dumps(run_page(page, out / f"work{i}")))
            finally:
                os.chdir(cwd)
        if result.exists():
            records.append(json.loads(result.read_text()))
        else:
            records.append({"page": _name(page), "blocks": [], "error": "the page's process died", "seconds": None})
        rec = records[-1]
        print(f"[docs] {rec['page']}: {'ok' if rec['error'] is None else 'FAILED'} in {rec['seconds']} s", flush=True)
    return records


RUNNABLE = [p for p in PAGES if python_blocks(p)]


def test_every_fenced_block_names_a_known_language():
    bad = [
        f"{page.relative_to(ROOT)}:{line - 1} {lang!r}"
        for page in PAGES
        for lang, line, _ in fenced_blocks(page.read_text())
        if lang not in LANGUAGES
    ]
    assert not bad, f"fenced blocks must be one of {sorted(LANGUAGES)} (python runs in the tests): {bad}"


def test_the_block_parser():
    text = "a\n```python\nif x:\n    y = 1\n```\n- item\n  ```sh\n  ls\n  ```\n````text\n```python\n````\n"
    assert fenced_blocks(text) == [("python", 3, "if x:\n    y = 1"), ("sh", 8, "ls"), ("text", 11, "```python")]


@pytest.fixture(scope="module")
def page_results(request, tmp_path_factory) -> dict[str, dict]:
    """Run every selected page once, in one runner process (imports paid once)."""
    selected = [
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_python_blocks_run_in_order" and hasattr(item, "callspec")
    ]
    out = tmp_path_factory.mktemp("docs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), *map(str, selected)]
    r = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    results = {}
    for i in range(len(selected)):
        f = out / f"page{i}.json"
        if f.exists():
            rec = json.loads(f.read_text())
            results[rec["page"]] = rec
    results["_log"] = r.stdout[-4000:] + r.stderr[-4000:]
    return results


@pytest.mark.parametrize("page", RUNNABLE, ids=[_name(p) for p in RUNNABLE])
def test_python_blocks_run_in_order(page, page_results):
    rec = page_results.get(_name(page))
    assert rec is not None, f"{_name(page)} did not report:\n{page_results['_log']}"
    assert rec["error"] is None, rec["error"]


def test_what_api_md_names_is_reachable_after_a_plain_import():
    """docs/api.md: "Everything below is importable from `normscore`" - every dotted name it
    mentions resolves after ``import normscore`` alone, and the import stays light (the tool
    packages load on first access)."""
    text = (ROOT / "docs" / "api.md").read_text()
    names = set(re.findall(r"\bnormscore(?:\.[A-Za-z_]\w*)+", text))
    for prefix, members in re.findall(r"\b(normscore(?:\.\w+)*)\.\{([^}]*)\}", text):
        names |= {f"{prefix}.{m.strip()}" for m in members.split(",")}
    assert {"normscore.data.get_dataset", "normscore.models.load_model", "normscore.metrics.aupr_trapz"} <= names
    code = f"""
import sys, normscore
lazy = ("bench", "data", "finetune", "models", "training")
loaded = [m for m in lazy if "normscore." + m in sys.modules]
assert not loaded, f"import normscore loaded {{loaded}}"
missing = []
for name in {sorted(names)!r}:
    obj = normscore
    try:
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)
    except AttributeError as e:
        missing.append(f"{{name}}: {{e}}")
assert not missing, missing
assert set(lazy) <= set(dir(normscore)), "dir(normscore) lacks the lazy submodules"
try:
    normscore.no_such_thing
except AttributeError as e:
    assert "no_such_thing" in str(e)
else:
    raise AssertionError("an unknown attribute did not raise AttributeError")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


if __name__ == "__main__":
    args = sys.argv[1:]
    out = Path(args.pop(args.index("--out") + 1)) if "--out" in args else Path(tempfile.mkdtemp(prefix="docs-"))
    args = [a for a in args if a != "--out"]
    recs = run_pages([Path(a).resolve() for a in args] or RUNNABLE, out)
    for rec in recs:
        if rec["error"]:
            print(rec["error"], file=sys.stderr)
    sys.exit(any(rec["error"] for rec in recs))
