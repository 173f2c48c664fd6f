"""The local dataset registry (core sets), the small CNN and the plain trainer."""

from __future__ import annotations

import os

import pytest
import torch

import normscore
from normscore.data import FASHION_MNIST_DIR, get_dataset, list_datasets
from normscore.errors import ConfigError, MissingResourceError
from normscore.models import small_cnn
from normscore.training import evaluate_accuracy, train_classifier


def test_registry_lists_core_sets_and_rejects_unknown():
    for n in ("fashion-mnist", "mnist-5k", "sklearn-digits", "textures", "noise"):
        assert n in list_datasets()
    with pytest.raises(ConfigError, match="Did you mean 'textures'"):
        get_dataset("texture")
    with pytest.raises(ConfigError, match="no split"):
        get_dataset("mnist-5k", "train")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_and_conversions():
    tr = get_dataset("fashion-mnist", "train")
    te = get_dataset("fashion-mnist", "test")
    assert len(tr) == 60000 and len(te) == 10000
    x, y = te[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert int(y) == 9  # the first test image is an ankle boot
    rgb = get_dataset("fashion-mnist", "test", channels=3, image_size=32, limit=10)
    assert rgb[0][0].shape == (3, 32, 32)
    a = get_dataset("fashion-mnist", "test", limit=50, seed=1).labels
    b = get_dataset("fashion-mnist", "test", limit=50, seed=1).labels
    assert torch.equal(a, b)


def test_missing_files_say_what_to_install(tmp_path):
    with pytest.raises(MissingResourceError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion-mnist", "test", data_root=str(tmp_path))


def test_ood_sets_in_the_fmnist_format():
    for n in ("mnist-5k", "sklearn-digits", "textures", "noise"):
        ds = get_dataset(n, channels=1, image_size=28, limit=20)
        x, _ = ds[3]
        assert x.shape == (1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_small_cnn_trains_and_is_adapted():
    torch.manual_seed(0)
    x = torch.rand(256, 1, 28, 28)
    y = (x.mean((1, 2, 3)) > x.mean()).long()
    ds = torch.utils.data.TensorDataset(x, y)
    model = small_cnn(num_classes=2, width=8)
    before = evaluate_accuracy(model, ds)
    train_classifier(model, ds, epochs=3, batch_size=32, lr=5e-3, progress=False, augment=False)
    assert evaluate_accuracy(model, ds) > max(before, 0.8)
    a = normscore.get_adapter(model)
    a.ensure_resolved(x[:1])
    assert a.block_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"] and a.head_name == "fc"
