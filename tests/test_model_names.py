"""One model-name format for normscore-bench and normscore-finetune, old spellings deprecated."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from bench_helpers import save_checkpoint

from normscore.bench.cli import main as bench_main
from normscore.bench.models import InputFormat, build_model
from normscore.errors import ConfigError
from normscore.finetune.cli import build_model as finetune_build_model
from normscore.finetune.cli import main as finetune_main
from normscore.models import SmallCNN
from normscore.tools.model_names import parse_model_name


@pytest.mark.parametrize(
    ("name", "kind", "arch", "width", "canonical"),
    [
        ("smallcnn", "smallcnn", "smallcnn", None, "smallcnn"),
        ("smallcnn:16", "smallcnn", "smallcnn", 16, "smallcnn:16"),
        ("efficientnet_lite0", "local", "efficientnet_lite0", None, "efficientnet_lite0"),
        ("resnet50", "timm", "resnet50", None, "resnet50"),
        ("resnet50.a1_in1k", "timm", "resnet50.a1_in1k", None, "resnet50.a1_in1k"),
        ("tv:resnet50", "torchvision", "resnet50", None, "tv:resnet50"),
    ],
)
def test_current_names_parse_without_warning(name, kind, arch, width, canonical):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = parse_model_name(name)
    assert (m.kind, m.arch, m.width, m.canonical, m.deprecated) == (kind, arch, width, canonical, None)
    assert parse_model_name(m.canonical) == m


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("small_cnn", "smallcnn"),
        ("small_cnn:8", "smallcnn:8"),
        ("timm:resnet18", "resnet18"),
        ("torchvision:resnet18", "tv:resnet18"),
    ],
)
def test_old_spellings_work_and_name_the_new_one(old, new):
    with pytest.warns(DeprecationWarning, match=f"write '{new}'"):
        m = parse_model_name(old)
    assert m.canonical == new and m.deprecated == old
    assert parse_model_name(old, warn=False).canonical == new


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("resnt50", "similar: resnet50"),
        ("tv:resnt50", "Did you mean 'resnet50'"),
        ("smallcnn:wide", "width must be a positive integer"),
        ("smallcnn:0", "width must be a positive integer"),
        ("hub:resnet50", "unknown prefix"),
        ("tv:", "name the torchvision model"),
        ("", "non-empty"),
    ],
)
def test_bad_names_say_what_is_wrong(bad, says):
    with pytest.raises(ConfigError, match=says):
        parse_model_name(bad)


def test_both_clis_build_the_same_architecture_from_one_name():
    torch.manual_seed(0)
    ft = finetune_build_model("smallcnn:8", 10, 1)
    native = InputFormat(1, (28, 28))
    kw = {"num_classes": 10, "in_chans": 1, "checkpoint": None, "train": True, "native_format": native}
    lm = build_model("smallcnn:8", **kw)
    assert isinstance(ft, SmallCNN) and isinstance(lm.model, SmallCNN) and lm.name == "smallcnn:8"
    assert [p.shape for p in ft.parameters()] == [p.shape for p in lm.model.parameters()]
    assert ft.fc.in_features == 32  # 4 * width
    tv = finetune_build_model("tv:resnet18", 10, 3)
    assert type(tv) is type(build_model("tv:resnet18", **{**kw, "in_chans": 3}).model) is torchvision.models.ResNet
    with pytest.warns(DeprecationWarning, match="write 'smallcnn'"):
        lm = build_model("small_cnn", **kw)
    assert lm.name == "smallcnn"
    with pytest.warns(DeprecationWarning, match="write 'tv:resnet18'"):
        assert isinstance(finetune_build_model("torchvision:resnet18", 10, 3), torchvision.models.ResNet)


def test_bench_cli_prints_a_deprecation_note_for_an_old_spelling(tmp_path, capsys):
    ckpt = save_checkpoint(str(tmp_path / "smallcnn.pt"))
    args = ["--checkpoint", ckpt, "--limit", "0", "--out", str(tmp_path / "o"), "--quiet"]
    assert bench_main(["--model", "small_cnn", *args]) == 2  # stops at --limit 0, after the name
    err = capsys.readouterr().err
    assert "note: model name 'small_cnn' is deprecated; write 'smallcnn'" in err
    assert bench_main(["--model", "smallcnn", *args]) == 2
    assert "deprecated" not in capsys.readouterr().err
    assert bench_main(["--model", "resnt50", *args]) == 2
    assert "similar: resnet50" in capsys.readouterr().err


def test_finetune_cli_checks_the_name_before_loading_data(tmp_path, capsys):
    base = ["train", "--dataset", "no-such-set", "--out", str(tmp_path / "run"), "--quiet"]
    assert finetune_main([*base, "--model", "timm:resnet18"]) == 2
    err = capsys.readouterr().err
    assert "note: model name 'timm:resnet18' is deprecated; write 'resnet18'" in err
    assert "no-such-set" in err  # the name passed; the data set is what fails
    assert finetune_main([*base, "--model", "resnt50"]) == 2
    err = capsys.readouterr().err
    assert "similar: resnet50" in err and "no-such-set" not in err
    assert finetune_main([*base, "--model", "efficientnet_lite0"]) == 2
    assert "trains from random initialisation" in capsys.readouterr().err
