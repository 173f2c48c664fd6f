"""The bad-input catalogue: every case raises a specific exception at the API boundary whose
message names the problem and the fix. docs/errors.md lists the same case ids (checked below).
"""

from __future__ import annotations

import pickle
import re
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import TinyCNN, make_loader
from torch import nn

import normscore
import normscore.data  # the dataset cases (normscore.data / normscore.models are submodules)
import normscore.models
from normscore.errors import (
    AdapterError,
    ConfigError,
    FormatError,
    InputError,
    InputTypeError,
    MissingResourceError,
    ModelMismatchError,
    NormscoreError,
    NotFittedError,
)
from normscore.pipeline import ScoringModule

ROOT = Path(__file__).resolve().parents[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def _loader():
    return make_loader(n=40, batch=10)


def _x(*shape: int, **kw) -> torch.Tensor:
    return torch.randn(*shape, **kw)


def _fitted(name: str = "energy", **hp) -> normscore.Detector:
    return normscore.create(name, **hp).fit(_model(), _loader())


def _saved(tmp: Path) -> Path:
    p = tmp / "d.ns"
    _fitted().save(p)
    return p


def _truncate(tmp: Path) -> None:
    p = _saved(tmp)
    p.write_bytes(p.read_bytes()[:-40])
    normscore.load(p)


def _tamper(tmp: Path) -> None:
    p = _saved(tmp)
    b = bytearray(p.read_bytes())
    b[-50] ^= 0xFF
    p.write_bytes(bytes(b))
    normscore.load(p)


def _future(tmp: Path) -> None:
    import hashlib
    import json
    import struct

    from normscore import io as nio

    p = _saved(tmp)
    d = p.read_bytes()
    hlen = struct.unpack("<Q", d[8:16])[0]
    h = json.loads(d[16 : 16 + hlen])
    h["format_version"] = 7
    hb = json.dumps(h).encode()
    body = nio.MAGIC + struct.pack("<Q", len(hb)) + hb + d[16 + hlen : -32]
    p.write_bytes(body + hashlib.sha256(body).digest())
    normscore.load(p)


def _pickle(tmp: Path) -> None:
    p = tmp / "model.pkl"
    p.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    normscore.load(p)


class _DictModel(nn.Module):
    def forward(self, x):
        return {"features": x}


class _ConstModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.ones(x.shape[0], 4))


def _fit_labels(transform: Callable[[torch.Tensor], object], name: str = "mahalanobis") -> None:
    normscore.create(name).fit(_model(), [(x, transform(y)) for x, y in _loader()])


def _pil() -> object:
    from PIL import Image

    return Image.new("RGB", (16, 16))


def _imagenet_empty_train(tmp: Path) -> None:
    (tmp / "train").mkdir()
    normscore.data.get_dataset("imagenet", "train", data_root=str(tmp))


def _bench_nothing_there(tmp: Path) -> None:
    from normscore.bench.runner import BenchConfig, run_benchmark

    run_benchmark(
        BenchConfig(
            id="imagenet",
            model="resnet18",
            checkpoint=str(tmp / "resnet18.pt"),
            data_root=str(tmp),
            detectors="msp",
            out=str(tmp / "out"),
            no_cache=True,
            progress=False,
        )
    )


# (case id, description, action(tmp_path), exception type, message pattern)
CASES: list[tuple[str, str, Callable[[Path], object], type, str]] = [
    (
        "nan-input",
        "NaN pixels in the batch",
        lambda t: _fitted().score(torch.full((2, 3, 16, 16), float("nan"))),
        InputError,
        "NaN or Inf",
    ),
    (
        "inf-input",
        "Inf pixels in the batch",
        lambda t: _fitted().score(torch.full((2, 3, 16, 16), float("inf"))),
        InputError,
        "NaN or Inf",
    ),
    (
        "wrong-channels",
        "1-channel images for a 3-channel model",
        lambda t: _fitted().score(_x(2, 1, 16, 16)),
        InputError,
        "channels",
    ),
    (
        "channels-last",
        "channels-last images [B, H, W, C]",
        lambda t: _fitted().score(_x(2, 16, 16, 3)),
        InputError,
        r"looks channels-last.*x\.permute\(0, 3, 1, 2\)",
    ),
    (
        "channels-last-first-call",
        "channels-last images before the model was ever run",
        lambda t: normscore.create("msp").attach(timm.create_model("resnet18", num_classes=3)).score(_x(1, 64, 64, 3)),
        InputError,
        r"looks channels-last.*x\.permute\(0, 3, 1, 2\)",
    ),
    (
        "pil-input",
        "a PIL image passed to score()",
        lambda t: _fitted().score(_pil()),
        InputTypeError,
        r"PIL image.*normscore\.input_transform\(model\)",
    ),
    (
        "numpy-input",
        "a numpy array passed to score()",
        lambda t: _fitted().score(_x(2, 3, 16, 16).numpy()),
        InputTypeError,
        r"numpy array.*torch\.from_numpy\(x\).*normscore\.input_transform\(model\)",
    ),
    (
        "vit-wrong-size",
        "48 px images for a ViT built for 32 px",
        lambda t: (
            normscore.create("msp")
            .attach(timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32))
            .score(_x(1, 3, 48, 48))
        ),
        InputError,
        "needs 32x32 inputs",
    ),
    (
        "3d-input",
        "a single image without batch dimension",
        lambda t: _fitted().score(_x(3, 16, 16)),
        InputError,
        "unsqueeze",
    ),
    ("5d-input", "a 5-D tensor", lambda t: _fitted().score(_x(1, 2, 3, 16, 16)), InputError, r"\[B, C, H, W\]"),
    (
        "integer-images",
        "uint8 images",
        lambda t: _fitted().score(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)),
        InputTypeError,
        "floating-point",
    ),
    ("empty-batch", "a batch of size 0", lambda t: _fitted().score(_x(0, 3, 16, 16)), InputError, "empty"),
    (
        "non-tensor-input",
        "a nested list instead of a tensor",
        lambda t: _fitted().score([[0.0]]),
        InputTypeError,
        "torch.Tensor",
    ),
    (
        "input-device",
        "input on another device than the model",
        lambda t: _fitted().score(_x(2, 3, 16, 16, device="meta")),
        InputError,
        "is on meta but the model is on cpu",
    ),
    (
        "empty-loader",
        "a fit loader without batches",
        lambda t: normscore.create("energy").fit(_model(), []),
        InputError,
        "no samples",
    ),
    (
        "loader-str",
        "a loader yielding strings",
        lambda t: normscore.create("energy").fit(_model(), ["a.jpg"]),
        InputTypeError,
        "yielded a str",
    ),
    (
        "loader-dict-keys",
        "dict batches without an image key",
        lambda t: normscore.create("energy").fit(_model(), [{"pix": _x(2, 3, 16, 16)}]),
        InputTypeError,
        "looks for the images",
    ),
    (
        "loader-pil",
        "a loader yielding non-tensor images in tuples",
        lambda t: normscore.create("energy").fit(_model(), [(["img"], [0])]),
        InputTypeError,
        "ToTensor",
    ),
    (
        "tensor-as-loader",
        "one tensor passed where a loader is expected",
        lambda t: normscore.create("energy").fit(_model(), _x(4, 3, 16, 16)),
        InputTypeError,
        "not one tensor",
    ),
    (
        "not-iterable-loader",
        "an int passed as loader",
        lambda t: normscore.create("energy").fit(_model(), 3),
        InputTypeError,
        "iterable of batches",
    ),
    (
        "mixed-labels",
        "some batches with labels, some without",
        lambda t: normscore.create("energy").fit(
            _model(), [(_x(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)), _x(4, 3, 16, 16)]
        ),
        InputError,
        "some batches",
    ),
    (
        "labels-missing",
        "class-conditional detector on an unlabelled loader",
        lambda t: normscore.create("mahalanobis").fit(_model(), [b[0] for b in _loader()]),
        InputError,
        "needs labels.*its first batch holds tensors of images only",
    ),
    (
        "labels-soft",
        "soft labels (rows of class probabilities) for a class-conditional detector",
        lambda t: _fit_labels(lambda y: torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01),
        InputError,
        r"soft labels \(10, 10\).*Accepted: class indices",
    ),
    (
        "labels-non-integral",
        "float labels with fractions",
        lambda t: _fit_labels(lambda y: y.float() + 0.5),
        InputError,
        r"non-integral values \(e\.g\. \d+\.5\)",
    ),
    (
        "labels-negative",
        "-1 labels (unlabelled samples) for a class-conditional detector",
        lambda t: _fit_labels(lambda y: y - 1),
        InputError,
        "negative",
    ),
    (
        "labels-masks",
        "per-pixel labels (masks) instead of class labels",
        lambda t: _fit_labels(lambda y: y[:, None, None].expand(-1, 16, 16)),
        InputError,
        r"of shape \(10, 16, 16\) for a batch of 10 images",
    ),
    (
        "labels-out-of-range",
        "labels beyond the model's classes",
        lambda t: normscore.create("mahalanobis").fit(_model(), [(x, y + 20) for x, y in _loader()]),
        InputError,
        r"class labels in \[0, 10\)",
    ),
    (
        "knn-fewer-than-k",
        "fewer fit samples than k neighbours",
        lambda t: normscore.create("knn", k=50).fit(_model(), _loader()),
        InputError,
        "k=50 neighbours are needed",
    ),
    (
        "vim-dim",
        "ViM principal dimension >= feature dimension",
        lambda t: normscore.create("vim", dim=100).fit(_model(), _loader()),
        ConfigError,
        "must be smaller than the feature dimension",
    ),
    (
        "constant-features",
        "identical features (zero covariance) for Mahalanobis",
        lambda t: normscore.create("mahalanobis").fit(
            _ConstModel().eval(), [(_x(10, 3, 8, 8), torch.randint(0, 3, (10,)))] * 3
        ),
        InputError,
        "covariance is zero",
    ),
    (
        "score-before-fit",
        "score() on an unfitted detector",
        lambda t: normscore.create("mahalanobis").score(_x(2, 3, 16, 16)),
        NotFittedError,
        "fit",
    ),
    (
        "predict-uncalibrated",
        "predict() after a fit without calibration",
        lambda t: normscore.create("mahalanobis").fit(_model(), _loader(), calibration=0.0).predict(_x(2, 3, 16, 16)),
        NotFittedError,
        "no calibrated threshold",
    ),
    (
        "unknown-detector",
        "misspelt detector name",
        lambda t: normscore.create("mahalanobise"),
        ConfigError,
        "Did you mean 'mahalanobis'",
    ),
    (
        "unknown-hyperparameter",
        "misspelt hyperparameter",
        lambda t: normscore.create("knn", kk=5),
        ConfigError,
        "Did you mean 'k'",
    ),
    (
        "hyperparameter-range",
        "out-of-range hyperparameter",
        lambda t: normscore.create("react", percentile=150),
        ConfigError,
        "out of range",
    ),
    (
        "hyperparameter-type",
        "wrong hyperparameter type",
        lambda t: normscore.create("knn", k="five"),
        ConfigError,
        "must be an integer",
    ),
    (
        "hyperparameter-choice",
        "a value outside a hyperparameter's choices",
        lambda t: normscore.create("ash", variant="q"),
        ConfigError,
        "choose one of",
    ),
    (
        "unknown-block",
        "a block name that does not exist",
        lambda t: normscore.create("featurenorm", block="features.99").fit(_model(), _loader()),
        AdapterError,
        "Valid blocks",
    ),
    (
        "unknown-module",
        "an adapter override naming a missing module",
        lambda t: normscore.Adapter(_model(), blocks=["feature.2"]),
        AdapterError,
        "Did you mean 'features.2'",
    ),
    (
        "no-linear-head",
        "feature detector on squeezenet (conv classifier)",
        lambda t: (
            normscore.create("penultimate_norm")
            .attach(torchvision.models.squeezenet1_0(num_classes=4))
            .score(_x(1, 3, 64, 64))
        ),
        AdapterError,
        "no linear head",
    ),
    (
        "non-logits-output",
        "a model whose forward returns a dict of features",
        lambda t: normscore.create("msp").attach(_DictModel()).score(_x(1, 3, 4, 4)),
        AdapterError,
        "not a logits tensor",
    ),
    (
        "model-not-module",
        "a model name string instead of a module",
        lambda t: normscore.create("energy").fit("resnet18", _loader()),
        ConfigError,
        "nn.Module",
    ),
    (
        "tpr-range",
        "tpr outside (0, 1]",
        lambda t: normscore.create("energy").fit(_model(), _loader(), tpr=1.5),
        ConfigError,
        r"tpr must be in \(0, 1\]",
    ),
    (
        "calibration-range",
        "calibration share outside [0, 1)",
        lambda t: normscore.create("energy").fit(_model(), _loader(), calibration=1.0),
        InputError,
        r"calibration must be in \[0, 1\)",
    ),
    (
        "cached-multipass",
        "fit_features for a detector that needs the model",
        lambda t: normscore.create("fusion").attach(_model()).fit_features([]),
        ConfigError,
        "need the model during fit",
    ),
    (
        "fusion-no-holdout",
        "fusion without held-out data",
        lambda t: normscore.create("fusion").fit(_model(), _loader(), calibration=0.0),
        ConfigError,
        "calibration > 0",
    ),
    (
        "scoring-module-foreign",
        "a detector attached to another model",
        lambda t: ScoringModule(TinyCNN(), _fitted()),
        ConfigError,
        "different model",
    ),
    (
        "model-mismatch",
        "a fitted detector attached to another checkpoint",
        lambda t: _fitted().attach(_other_checkpoint()),
        ModelMismatchError,
        "fitted on another model",
    ),
    (
        "feature-width",
        "a detector reused with strict=False on a model of another width",
        lambda t: _reused_knn(),
        InputError,
        r"features have shape \[8\] per sample, but the detector was fitted on \[16\]",
    ),
    (
        "inference-mode-gradients",
        "a gradient detector under torch.inference_mode",
        lambda t: _inference_mode_odin(),
        InputError,
        "inference_mode",
    ),
    (
        "save-unfitted",
        "save() of a detector that was never fitted",
        lambda t: normscore.create("mahalanobis").save(t / "d.ns"),
        NotFittedError,
        "not fitted: there is no fitted state to save",
    ),
    (
        "save-to-directory",
        "save() to a folder",
        lambda t: _fitted().save(t),
        FormatError,
        r"is a directory; save\(\) writes one file",
    ),
    (
        "load-directory",
        "load() of a folder",
        lambda t: normscore.load(t),
        FormatError,
        r"is a directory; load\(\) reads the one file",
    ),
    ("file-truncated", "a truncated saved detector", _truncate, FormatError, "truncated"),
    ("file-tampered", "a modified saved detector", _tamper, FormatError, "checksum"),
    ("file-future", "a file from a newer format version", _future, FormatError, "format version 7"),
    ("file-pickle", "a pickle passed to load()", _pickle, FormatError, "never loads pickles"),
    ("file-missing", "a path that does not exist", lambda t: normscore.load(t / "nope.ns"), FormatError, "no file"),
    (
        "dataset-unknown",
        "a misspelt dataset name",
        lambda t: normscore.data.get_dataset("fashion-mnistt"),
        ConfigError,
        "Did you mean 'fashion-mnist'",
    ),
    (
        "dataset-missing-files",
        "a dataset whose files are not installed",
        lambda t: normscore.data.get_dataset("fashion-mnist", data_root=str(t)),
        MissingResourceError,
        "apt-get install dataset-fashion-mnist",
    ),
    (
        "imagenet-empty-train",
        "an ImageNet data root whose train/ folder is empty",
        _imagenet_empty_train,
        MissingResourceError,
        r"train is empty\. Put the ImageNet train images there",
    ),
    (
        "bench-missing-pieces",
        "normscore-bench on ImageNet without the checkpoint and without the data",
        _bench_nothing_there,
        MissingResourceError,
        r"(?s)8 missing pieces; nothing was run.*checkpoint .*resnet18\.pt does not exist.*"
        r"imagenet:train.*imagenet:val.*imagenet:openimage_o",
    ),
    (
        "local-model-unknown",
        "an unknown local pretrained model",
        lambda t: normscore.models.load_model("resnet50"),
        ConfigError,
        "unknown local model",
    ),
    (
        "layer-unknown-block",
        "a feature detector at a misspelt block (layer=)",
        lambda t: normscore.create("mahalanobis", layer="feature.2").fit(_model(), _loader()),
        AdapterError,
        r"Did you mean 'features.2'\?.*Valid blocks",
    ),
    (
        "layer-needs-head",
        "layer= on a detector whose formula needs the linear head",
        lambda t: normscore.create("vim", layer="features.2"),
        ConfigError,
        r"not available: ViM's virtual logit is defined on the head's input only",
    ),
]


def _other_checkpoint() -> nn.Module:
    torch.manual_seed(1)
    return TinyCNN().eval()


def _reused_knn() -> None:
    det = _fitted("knn", k=3)
    with pytest.warns(UserWarning, match="strict=False"):
        det.attach(TinyCNN(width=4).eval(), strict=False)
    det.score(_x(2, 3, 16, 16))


def _inference_mode_odin() -> None:
    model = _model()
    det = normscore.create("odin").fit(model, _loader())
    with torch.inference_mode():
        ScoringModule(model, det)(_x(2, 3, 16, 16))


DOC = ROOT / "docs" / "errors.md"
_TABLE_HEAD = "| case | situation | exception | message |\n|---|---|---|---|\n"
_SHOWN = 300  # characters of a message shown in docs/errors.md


def doc_message(message: str, tmp: Path) -> str:
    """A message as docs/errors.md shows it: the temporary folder as <tmp>, one line, shortened."""
    m = " ".join(message.replace(str(tmp), "<tmp>").split()).replace("|", "\\|")
    return m if len(m) <= _SHOWN else m[:_SHOWN] + " ..."


def doc_row(case: tuple, message: str, tmp: Path) -> str:
    cid, what, _, exc, _ = case
    return f"| `{cid}` | {what} | `{exc.__name__}` | {doc_message(message, tmp)} |"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_catalogue(case, tmp_path):
    cid, _, action, exc, pattern = case
    with pytest.raises(exc) as info:
        action(tmp_path)
    assert isinstance(info.value, NormscoreError), f"{cid}: {type(info.value)} is not a NormscoreError"
    assert re.search(pattern, str(info.value)), f"{cid}: {info.value}"
    # raised at the API boundary: the innermost frame is normscore code, not torch internals
    frames = traceback.extract_tb(info.tb)
    assert "normscore" in frames[-1].filename, f"{cid}: raised from {frames[-1].filename}"
    # docs/errors.md shows this very message
    row = doc_row(case, str(info.value), tmp_path)
    assert row in DOC.read_text().splitlines(), (
        f"docs/errors.md does not show the current message of {cid!r}; regenerate it: "
        f"PYTHONPATH=. python tests/test_errors.py\n{row}"
    )


def test_catalogue_size_and_docs():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES), "duplicate case ids"
    doc = DOC.read_text()
    table = doc[doc.index(_TABLE_HEAD) + len(_TABLE_HEAD) :].split("\n\n")[0]
    ids = [line.split("`")[1] for line in table.splitlines()]
    assert ids == [c[0] for c in CASES], "docs/errors.md lists other cases; regenerate: python tests/test_errors.py"
    assert f"({len(CASES)} cases)" in doc


def write_docs() -> None:
    """Regenerate the catalogue table of docs/errors.md from CASES with the real messages."""
    import tempfile
    import warnings

    from normscore.errors import CalibrationWarning

    warnings.simplefilter("ignore", CalibrationWarning)
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            try:
                case[2](tmp)
            except Exception as e:  # noqa: BLE001 - recorded, checked by the tests
                rows.append(doc_row(case, str(e), tmp))
            else:
                raise SystemExit(f"case {case[0]!r} raised nothing")
    text = DOC.read_text()
    start = text.index(_TABLE_HEAD) + len(_TABLE_HEAD)
    end = text.index("\n\n", start)
    text = text[:start] + "\n".join(rows) + text[end:]
    text = re.sub(r"\(\d+ cases\)", f"({len(CASES)} cases)", text)
    DOC.write_text(text)
    print(f"wrote {len(rows)} rows to {DOC}")


if __name__ == "__main__":
    write_docs()
