"""The --help of normscore-bench and normscore-finetune: plain text, every option explained
with its default, and the suites' default sizes read from the suites."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from normscore.bench import suites
from normscore.bench.cli import build_parser as bench_parser
from normscore.bench.cli import main as bench_main
from normscore.finetune.cli import _parser as finetune_parser
from normscore.finetune.cli import main as finetune_main
from normscore.tools.cli_help import HelpFormatter

RST = ("``", "::", ":func:", ":class:", ":mod:")


def _rst_free(text: str) -> bool:
    return not any(bad in text for bad in RST) and not re.search(r"^\s*\.\. \w", text, re.M)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    out = {"normscore-bench": bench_parser(), "normscore-finetune": finetune_parser()}
    for a in out["normscore-finetune"]._actions:
        if isinstance(a, argparse._SubParsersAction):
            out.update({f"normscore-finetune {k}": p for k, p in a.choices.items()})
    return out


@pytest.mark.parametrize("prog", list(_parsers()))
def test_every_option_has_help_and_says_its_default(prog):
    parser = _parsers()[prog]
    fmt = HelpFormatter(prog)
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert a.help and len(a.help) > 5, f"{prog} {a.option_strings or a.dest} has no help"
        if a.option_strings and a.nargs != 0 and not a.required:  # a value option: say its default
            assert "default" in fmt._get_help_string(a), f"{prog} {a.option_strings} does not say its default"
    assert _rst_free(parser.format_help()), f"reStructuredText in {prog} --help"


def test_finetune_help_is_plain_text_with_examples_in_the_current_model_names(capsys):
    with pytest.raises(SystemExit) as e:
        finetune_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "normscore-finetune train --method rna" in text and "--model smallcnn" in text
    assert "small_cnn" not in text and _rst_free(text)
    with pytest.raises(SystemExit):
        finetune_main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--lr LR               initial learning rate (default: 0.001)" in text
    assert "(default: smallcnn)" in text


def test_bench_help_shows_the_suites_default_sizes(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside names
    fm = suites.SUITES["fashion-mnist"]
    monkeypatch.setitem(
        suites.SUITES, "fashion-mnist", dataclasses.replace(fm, fit_size=12345, test_size=678, live_fit_size=91)
    )
    with pytest.raises(SystemExit):
        bench_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fashion-mnist 12,345" in text and "fashion-mnist 678" in text and "fashion-mnist 91" in text
    assert "detectors fitted on 12,345 train images (91 for live detectors)" in text
    assert "tested on at most 678 images of each test set" in text
    assert "imagenet 50,000" in text and "imagenet all" in text  # the imagenet suite tests on every image
