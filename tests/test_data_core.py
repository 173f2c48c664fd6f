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


def test_deterministic_training_turns_onednn_off_for_the_training_only():
    """With several threads oneDNN's convolution backward may sum in a schedule-dependent order
    (two cold normscore-bench trainings on a loaded machine gave different weights);
    deterministic=True trains with oneDNN off (bitwise reproducible) and restores the flag."""
    from normscore.models import small_cnn
    from normscore.training import train_classifier

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(
        torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    )
    before = torch.backends.mkldnn.enabled
    for det in (True, False):
        seen = []
        torch.manual_seed(0)
        model = small_cnn(width=8)
        model.register_forward_hook(lambda m, i, o, seen=seen: seen.append(torch.backends.mkldnn.enabled))
        train_classifier(model, ds, epochs=1, batch_size=32, progress=False, deterministic=det)
        assert seen and all(s == (not det) for s in seen)
        assert torch.backends.mkldnn.enabled == before
    hashes = []
    for _ in range(2):
        torch.manual_seed(0)
        model = train_classifier(small_cnn(width=8), ds, epochs=1, batch_size=32, progress=False, deterministic=True)
        hashes.append(torch.cat([t.flatten().float() for t in model.state_dict().values()]))
    assert torch.equal(hashes[0], hashes[1])
