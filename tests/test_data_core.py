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
    train_classifier(model, ds, epochs=3, batch_size=32, progress=False, augment=False)
    assert evaluate_accuracy(model, ds) > max(before, 0.8)
    a = normscore.get_adapter(model)
    a.ensure_resolved(x[:1])
    assert a.block_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"] and a.head_name == "fc"


def test_training_is_bitwise_reproducible_at_any_thread_count():
    """The bench's training path: the same weights whatever torch.get_num_threads() is (it
    trains on one intra-op thread and restores the setting), while other threads load the CPU,
    and without touching the global random state. deterministic=False uses the threads set."""
    import threading

    from normscore.models import small_cnn
    from normscore.training import train_classifier

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(
        torch.rand(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    )

    def train(threads: int, deterministic: bool = True) -> tuple[torch.Tensor, list[int]]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(0)
            model = small_cnn(width=8)
            seen: list[int] = []
            model.register_forward_hook(lambda m, i, o: seen.append(torch.get_num_threads()))
            rng = torch.get_rng_state()
            train_classifier(model, ds, epochs=2, batch_size=32, progress=False, deterministic=deterministic)
            assert torch.equal(torch.get_rng_state(), rng), "the global RNG state changed"
            assert torch.get_num_threads() == threads, "the thread setting was not restored"
            return torch.cat([t.flatten().double() for t in model.state_dict().values()]), seen
        finally:
            torch.set_num_threads(before)

    ref, seen = train(1)
    assert set(seen) == {1}
    stop = threading.Event()

    def burn() -> None:  # load: another thread keeps multi-threaded GEMMs running
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))  # not the global RNG
        while not stop.is_set():
            a = (a @ a).tanh()

    burner = threading.Thread(target=burn)
    burner.start()
    try:
        for _ in range(2):
            weights, seen = train(2)
            assert set(seen) == {1}
            assert torch.equal(weights, ref)
    finally:
        stop.set()
        burner.join()
    _, seen = train(2, deterministic=False)
    assert set(seen) == {2}
