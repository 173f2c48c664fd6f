"""The local data sets: OpenCV, photos, noise, Fashion-MNIST-C, imagefolder:PATH and imagenet."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from normscore.data import OPENCV_DATA_DIR, dataset_info, get_dataset, list_datasets
from normscore.data.sets import FMNIST_C_CORRUPTIONS, OPENCV_PHOTOS
from normscore.errors import ConfigError, MissingResourceError


def test_every_registered_set_is_listed():
    for n in (
        "fashion-mnist",
        "mnist-5k",
        "sklearn-digits",
        "opencv-digits",
        "opencv-photos",
        "photos",
        "textures",
        "noise",
        "fashion-mnist-c",
        "imagenet",
    ):
        assert n in list_datasets(), n


def test_opencv_digits_are_mnist_like():
    ds = get_dataset("opencv-digits")
    assert len(ds) == 5000
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 500))
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and int(y) == 0
    assert float(x[:, :4].max()) == 0.0  # the 4 px padding is black
    assert float(x.max()) > 0.9  # white strokes


def test_opencv_photos_and_photos_are_disjoint_crop_sets_at_any_size():
    op = get_dataset("opencv-photos", channels=3, image_size=96)
    ph = get_dataset("photos", channels=3, image_size=96)
    assert len(op) == 40 * len(OPENCV_PHOTOS) and len(ph) == 40 * 27
    assert op[5][0].shape == (3, 96, 96) and ph[5][0].shape == (3, 96, 96)
    assert int(op.labels.max()) == -1
    # the central crop of a photo at 224 px is cut from the full-resolution photo, not upscaled
    big = get_dataset("photos", channels=3, image_size=224, indices=[0])[0][0]
    small = get_dataset("photos", channels=3, image_size=28, indices=[0])[0][0]
    assert big.shape == (3, 224, 224) and small.shape == (3, 28, 28)
    up = torch.nn.functional.interpolate(small[None], size=224, mode="bilinear")[0]
    assert float((big - up).abs().mean()) > 0.01  # more detail than an upsampled thumbnail
    gray = get_dataset("photos", channels=1, image_size=28, limit=3)
    assert gray[0][0].shape == (1, 28, 28)


def test_textures_crop_side_follows_the_model_size():
    t28 = get_dataset("textures", channels=1, image_size=28)
    t224 = get_dataset("textures", channels=3, image_size=224, limit=4)
    assert len(t28) == 2100 and t224[0][0].shape == (3, 224, 224)
    assert t224.source.boxes[0][3] == 224 and t28.source.boxes[0][3] == 64


def test_noise_is_generated_in_the_requested_format():
    rgb = get_dataset("noise", channels=3, image_size=40)
    x, _ = rgb[0]
    assert x.shape == (3, 40, 40)
    assert not torch.allclose(x[0], x[1])  # independent channels, not gray replicated
    g = get_dataset("noise")
    assert g[0][0].shape == (1, 28, 28) and len(g) == 2000
    assert torch.equal(get_dataset("noise", channels=3, image_size=40)[7][0], rgb[7][0])  # deterministic
    gauss = g[1999][0]
    assert abs(float(gauss.mean()) - 0.5) < 0.05 and float(gauss.std()) < 0.3


def test_limit_and_indices_select_rows():
    ds = get_dataset("mnist-5k", indices=[10, 3, 7])
    assert torch.equal(ds.labels, get_dataset("mnist-5k").labels[[10, 3, 7]])
    sub = get_dataset("photos", limit=10, seed=3)
    assert len(sub) == 10 and sub.fingerprint() == get_dataset("photos", limit=10, seed=3).fingerprint()
    assert sub.fingerprint() != get_dataset("photos", limit=10, seed=4).fingerprint()
    with pytest.raises(ConfigError, match="out of range"):
        get_dataset("mnist-5k", indices=[5000])


def test_opencv_missing_files_name_the_package(tmp_path):
    with pytest.raises(MissingResourceError, match="opencv-doc"):
        get_dataset("opencv-digits", data_root=str(tmp_path))
    with pytest.raises(MissingResourceError, match="opencv-doc"):
        get_dataset("opencv-photos", data_root=str(tmp_path))
    assert os.path.isdir(OPENCV_DATA_DIR)  # CI installs opencv-doc


def _write_fmnist(root, n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x[:, :6] = 0
    y = rng.integers(0, 10, n, dtype=np.uint8)
    with gzip.open(os.path.join(root, "t10k-images-idx3-ubyte.gz"), "wb") as f:
        f.write(b"\0" * 16 + x.tobytes())
    with gzip.open(os.path.join(root, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(b"\0" * 8 + y.tobytes())
    return x, y


def test_fashion_mnist_c_all_corruptions_and_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMSCORE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "fm"
    root.mkdir()
    x, y = _write_fmnist(str(root))
    info = dataset_info("fashion-mnist-c")
    assert "test" in info.splits and "motion_blur-5" in info.splits and len(FMNIST_C_CORRUPTIONS) == 16
    ds = get_dataset("fashion-mnist-c", "test", data_root=str(root))  # image i: corruption i % 16
    assert len(ds) == 48 and torch.equal(ds.labels, torch.as_tensor(y.astype(np.int64)))
    shifted = ds.images[:, 0].numpy()
    assert shifted.shape == x.shape and shifted.dtype == np.uint8
    diff = np.abs(shifted.astype(int) - x.astype(int)).mean(axis=(1, 2))
    assert (diff > 0).sum() >= 44  # (nearly) every corruption changes the image
    files = os.listdir(tmp_path / "cache" / "data" / "fashion-mnist-c")
    assert len(files) == 1 and files[0].startswith("test-") and files[0].endswith(".npy")
    again = get_dataset("fashion-mnist-c", "test", data_root=str(root))
    assert torch.equal(again.images, ds.images)  # read back from the cache
    stronger = get_dataset("fashion-mnist-c", "contrast-5", data_root=str(root)).images.float()
    weaker = get_dataset("fashion-mnist-c", "contrast-1", data_root=str(root)).images.float()
    assert float(stronger.std()) < float(weaker.std())  # severity matters
    with pytest.raises(ConfigError, match="no split"):
        get_dataset("fashion-mnist-c", "fog")


def _img(path, size=(40, 30), color=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_splits_labels_and_geometry(tmp_path):
    for split in ("train", "val"):
        for c, col in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(3):
                _img(str(tmp_path / split / c / f"{i}.png"), size=(60, 40), color=col)
    _img(str(tmp_path / "train" / "dog" / "nested" / "x.jpg"))
    info = dataset_info(f"imagefolder:{tmp_path}")
    assert info.splits == ("train", "val")
    tr = get_dataset(f"imagefolder:{tmp_path}", "train", image_size=32)
    assert len(tr) == 7 and tr.labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and tr.class_names == ["cat", "dog"]
    x, _ = tr[0]
    assert x.shape == (3, 32, 32) and float(x[0].mean()) > 0.95 and float(x[2].mean()) < 0.05
    gray = get_dataset(f"imagefolder:{tmp_path}", "val", channels=1, image_size=16)
    assert gray[0][0].shape == (1, 16, 16)
    flat = tmp_path / "flat"
    for i in range(2):
        _img(str(flat / f"{i}.jpg"))
    ood = get_dataset(f"imagefolder:{flat}")
    assert len(ood) == 2 and ood.labels.tolist() == [-1, -1]
    with pytest.raises(MissingResourceError, match="not a folder"):
        get_dataset(f"imagefolder:{tmp_path / 'nope'}")


def _fake_imagenet(
    root,
    classes=("n01", "n02", "n03"),
    per=2,
    ood=("ssb_hard", "ninco", "inaturalist", "textures", "openimage_o", "openimage_o_val"),
):
    for split in ("train", "val"):
        for k, c in enumerate(classes):
            for i in range(per):
                _img(os.path.join(root, split, c, f"{c}_{i}.JPEG"), size=(80, 60), color=(40 * k, 100, 50))
    for name in ood:
        for i in range(per):
            _img(os.path.join(root, "ood", name, "sub", f"{i}.jpg"), size=(50, 70), color=(0, 200, 0))


def test_imagenet_on_a_fake_imagefolder_tree(tmp_path):
    root = str(tmp_path)
    _fake_imagenet(root)
    tr = get_dataset("imagenet", "train", data_root=root)
    assert len(tr) == 6 and tr.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, _ = tr[0]
    assert x.shape == (3, 224, 224)  # default geometry: shorter side to 256, centre crop 224
    va = get_dataset("imagenet", "val", data_root=root, image_size=96, crop_pct=1.0, interpolation="bicubic")
    assert va[3][0].shape == (3, 96, 96) and va.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for name in ("ssb_hard", "ninco", "inaturalist", "textures", "openimage_o", "openimage_o_val"):
        o = get_dataset("imagenet", name, data_root=root, image_size=64)
        assert len(o) == 2 and o.labels.tolist() == [-1, -1] and o[1][0].shape == (3, 64, 64)


def test_imagenet_missing_parts_name_the_expected_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMSCORE_IMAGENET_ROOT", raising=False)
    with pytest.raises(MissingResourceError, match="--data-root"):
        get_dataset("imagenet", "val")
    root = str(tmp_path)
    _fake_imagenet(root, ood=("ssb_hard",))
    with pytest.raises(MissingResourceError) as e:
        get_dataset("imagenet", "ninco", data_root=root)
    msg = str(e.value)
    assert os.path.join(root, "ood", "ninco") in msg and "test_ninco.txt" in msg and "ROOT/val/<wnid>" in msg
    with pytest.raises(MissingResourceError, match="not a folder"):
        get_dataset("imagenet", "val", data_root=os.path.join(root, "missing"))
    # a validation folder without class sub-folders is refused with the reason
    other = tmp_path / "other"
    _img(str(other / "val" / "ILSVRC2012_val_00000001.JPEG"))
    with pytest.raises(MissingResourceError, match="class sub-folders"):
        get_dataset("imagenet", "val", data_root=str(other))
    monkeypatch.setenv("NORMSCORE_IMAGENET_ROOT", root)
    assert len(get_dataset("imagenet", "ssb_hard")) == 2


def test_imagenet_openood_image_lists(tmp_path):
    root = tmp_path
    lists = root / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True)
    _img(str(root / "images_largescale" / "imagenet_1k" / "val" / "a.JPEG"))
    _img(str(root / "images_largescale" / "imagenet_1k" / "val" / "b.JPEG"))
    _img(str(root / "images_largescale" / "ninco" / "x.jpg"))
    _img(str(root / "images_classic" / "texture" / "t.jpg"))
    (lists / "test_imagenet.txt").write_text("imagenet_1k/val/a.JPEG 5\nimagenet_1k/val/b.JPEG 7\n")
    (lists / "test_ninco.txt").write_text("ninco/x.jpg -1\n")
    (lists / "test_textures.txt").write_text("texture/t.jpg 0\n")
    (lists / "test_ssb_hard.txt").write_text("ssb_hard/missing.jpg -1\n")
    va = get_dataset("imagenet", "val", data_root=str(root), image_size=32)
    assert va.labels.tolist() == [5, 7] and va[1][0].shape == (3, 32, 32)
    assert get_dataset("imagenet", "ninco", data_root=str(root)).labels.tolist() == [-1]
    assert len(get_dataset("imagenet", "textures", data_root=str(root))) == 1  # under images_classic/
    with pytest.raises(MissingResourceError, match="no such file"):
        get_dataset("imagenet", "ssb_hard", data_root=str(root))
