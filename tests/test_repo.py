"""Repository hygiene: lint, format, and the README's commands are what CI runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed")


def test_ruff_lint():
    r = subprocess.run([*_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = subprocess.run([*_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup-commands -->\s*```sh\n(.*?)```", readme, re.S)
    assert block, "README must have the setup-commands block"
    cmds = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(cmds) == 2, cmds
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = [c for c in cmds if "pytest" in c]
    assert test_cmd and test_cmd[0].split("  #")[0].strip() in ci


def test_changelog_and_docs_exist():
    assert (ROOT / "CHANGELOG.md").exists()
    for page in ("index.md", "quickstart.md", "api.md", "methods.md", "architecture.md"):
        assert (ROOT / "docs" / page).exists(), page


def test_relative_links_in_readme_and_docs_resolve():
    import re

    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
