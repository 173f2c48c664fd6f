"""What fit/score accept: label forms read once by the fit stream, channels-last and raw images,
and normscore.input_transform (the model's own preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import timm.data
import torch
import torchvision
from helpers import TinyCNN, make_loader
from PIL import Image
from torch import nn
from torchvision import transforms as T

import normscore
from normscore.errors import ConfigError, InputError, InputTypeError
from normscore.stream import read_labels


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


class _Counting(nn.Module):
    """TinyCNN that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# labels


@pytest.mark.parametrize(
    "form",
    [
        lambda y: y.float(),
        lambda y: y.double()[:, None],
        lambda y: y[:, None],
        lambda y: torch.nn.functional.one_hot(y, 10),
        lambda y: torch.nn.functional.one_hot(y, 10).float(),
        lambda y: y.tolist(),
    ],
    ids=["float", "float-B1", "int-B1", "one-hot", "one-hot-float", "list"],
)
def test_unambiguous_label_forms_fit_exactly_like_integer_labels(form):
    loader = make_loader(n=60, batch=20)
    ref = normscore.create("mahalanobis").fit(_model(), loader)
    det = normscore.create("mahalanobis").fit(_model(), [(x, form(y)) for x, y in loader])
    for k in ("class_means_", "cov_eigvals_", "present_"):
        assert torch.equal(getattr(det, k), getattr(ref, k)), k
    x = loader[0][0]
    assert torch.equal(det.score(x), ref.score(x))


def test_read_labels_names_what_is_wrong():
    y = torch.tensor([0, 2, 1])
    assert torch.equal(read_labels(y.float(), 3)[0], y)
    assert torch.equal(read_labels(torch.eye(3)[y], 3)[0], y)
    assert read_labels(None, 3) == (None, None)
    assert read_labels(torch.tensor(4), 1)[0].tolist() == [4]
    for bad, words in [
        (torch.tensor([0.0, 0.5, 1.0]), "non-integral"),
        (torch.tensor([0.0, float("nan"), 1.0]), "NaN"),
        (torch.tensor([0, -1, 1]), "negative"),
        (torch.tensor([True, False, True]), "booleans"),
        (torch.full((3, 4), 0.25), "soft labels"),
        (torch.ones(3, 4), "not one-hot"),
        (torch.zeros(3, 8, 8), "of shape (3, 8, 8)"),
        (torch.zeros(5), "for a batch of 3 images"),
        (["a", "b", "c"], "cannot be converted"),
    ]:
        labels, problem = read_labels(bad, 3)
        assert labels is None and words in problem, (bad, problem)


def test_labels_are_checked_on_the_first_batch_before_the_model_runs():
    x = torch.randn(8, 3, 16, 16)

    class StopsAfterFirst:
        def __init__(self, first):
            self.first = first

        def __iter__(self):
            yield self.first
            raise AssertionError("the fit read past the first batch")

    for first, words in [(x, "yields no labels"), ((x, torch.full((8, 10), 0.1)), "soft labels")]:
        m = _Counting().eval()
        with pytest.raises(InputError, match=words):
            normscore.create("mahalanobis").fit(m, StopsAfterFirst(first))
        assert m.calls == 0
    # several detectors in one set: the message names those that need labels
    m = _Counting().eval()
    with pytest.raises(InputError, match="mahalanobis, she need labels"):
        normscore.DetectorSet(["energy", "mahalanobis", "she"]).fit(m, StopsAfterFirst(x))
    assert m.calls == 0


def test_label_problems_only_matter_to_detectors_that_need_labels():
    loader = [(x, torch.softmax(torch.randn(len(y), 10), 1)) for x, y in make_loader(n=40, batch=10)]
    ref = normscore.create("knn", k=3).fit(_model(), [x for x, _ in loader])
    det = normscore.create("knn", k=3).fit(_model(), loader)  # soft labels ignored: knn needs none
    assert torch.equal(det.score(loader[0][0]), ref.score(loader[0][0]))
    with pytest.raises(InputError, match="ldg needs class labels.*soft labels"):
        normscore.create("ldg", n_components=2, subspace="class_mean").fit(_model(), loader)


# ---------------------------------------------------------------------------------------------
# images


def test_channels_first_images_that_end_in_three_pixels_are_not_mistaken_for_channels_last():
    det = normscore.create("energy").fit(_model(), make_loader(n=20, batch=10))
    assert det.score(torch.randn(2, 3, 16, 3)).shape == (2,)


def _photo(w: int = 300, h: int = 200) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_input_transform_of_a_timm_model_is_its_data_config():
    model = timm.create_model("resnet18", num_classes=3).eval()  # no weights: pretrained_cfg anyway
    img = _photo()
    ref = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    tf = normscore.input_transform(model)
    assert torch.equal(tf(img), ref(img))
    assert torch.equal(tf(np.asarray(img)), ref(img))  # uint8 arrays [H, W, C] too
    assert tf(img.convert("L")).shape == (3, 224, 224)  # grayscale photos become RGB
    small = normscore.input_transform(model, input_size=64, crop_pct=1.0)
    x = torch.stack([small(img), small(_photo(90, 120))])
    assert x.shape == (2, 3, 64, 64)
    assert normscore.create("msp").attach(model).score(x).shape == (2,)


def test_input_transform_of_torchvision_models():
    model = torchvision.models.resnet18(num_classes=3).eval()
    img = _photo()
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1  # its transforms, not its file
    tf = normscore.input_transform(model, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(tf(img), weights.transforms()(img))
    default = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(normscore.preprocess.IMAGENET_MEAN, normscore.preprocess.IMAGENET_STD),
        ]
    )
    assert torch.allclose(normscore.input_transform(model)(img), default(img), atol=1e-6)
    vit = torchvision.models.vit_b_16(image_size=32, num_classes=3)
    assert normscore.input_transform(vit)(img).shape == (3, 32, 32)  # the model's image_size
    gray = normscore.input_transform(TinyCNN(in_chans=1), input_size=16)
    assert gray(img).shape == (1, 16, 16)


def test_input_transform_errors():
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ConfigError, match="no option 'size'"):
        normscore.input_transform(model, size=32)
    with pytest.raises(ConfigError, match="unknown torchvision weights"):
        normscore.input_transform(model, weights="ResNet18_Weights.NOPE")
    with pytest.raises(InputTypeError, match="uint8"):
        normscore.input_transform(model)(np.zeros((32, 32, 3), np.float32))
