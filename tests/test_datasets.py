"""Data loaders: CIFAR python directories (safely), .npz, image folders, and their errors."""
import os
import pickle

import numpy as np
import pytest

from pimc.datasets import CIFAR_NORMALISATION, load_images, preprocess
from pimc.core.errors import PimcError

RNG = np.random.default_rng(0)


def _write_cifar10(d, n=6):
    d.mkdir()
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": list(RNG.integers(0, 10, n)), b"data": data,
                         b"filenames": [b"a.png"] * n}, f)
    return d


def test_cifar10_directory_layout_and_splits(tmp_path):
    d = _write_cifar10(tmp_path / "cifar-10-batches-py")
    x, y = load_images(d, "test")
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    # channel-planar R,G,B rows become HWC pixels
    assert x[0, 0, 1, 0] == raw[b"data"][0, 1] and x[0, 0, 0, 2] == raw[b"data"][0, 2048]
    assert load_images(d, "train")[0].shape == (30, 32, 32, 3)


def test_cifar100_directory(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"]}))
    for split in ("train", "test"):
        with open(d / split, "wb") as f:
            pickle.dump({b"fine_labels": [1, 2], b"coarse_labels": [0, 0],
                         b"data": np.zeros((2, 3072), np.uint8)}, f)
    x, y = load_images(d, "test")
    assert x.shape == (2, 32, 32, 3) and y.tolist() == [1, 2]


def test_malicious_pickle_is_refused(tmp_path):
    d = _write_cifar10(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(PimcError, match="refusing to load"):
        load_images(d, "test")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["truncate", "labels"])
def test_corrupted_batches(tmp_path, damage):
    d = _write_cifar10(tmp_path / "c")
    if damage == "truncate":
        (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:500])
        msg = "test_batch"
    else:
        with open(d / "test_batch", "wb") as f:
            pickle.dump({b"labels": [1, 2, 3], b"data": np.zeros((6, 3072), np.uint8)}, f)
        msg = "6 images but 3 labels"
    with pytest.raises(PimcError, match=msg):
        load_images(d, "test")


def test_npz_and_errors(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.arange(4))
    x, y = load_images(tmp_path / "d.npz")
    assert x.shape == (4, 8, 8, 3) and y.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.arange(3))
    with pytest.raises(PimcError, match="4 images but y has shape"):
        load_images(tmp_path / "bad.npz")
    with pytest.raises(PimcError, match="not found"):
        load_images(tmp_path / "missing_dir")


def test_image_folder(tmp_path):
    PIL = pytest.importorskip("PIL.Image", reason="Pillow not installed (pip install 'pimc[images]')")
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            PIL.fromarray(RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    x, y = load_images(tmp_path / "imgs")
    assert x.shape == (4, 5, 5, 3) and y.tolist() == [0, 0, 1, 1]
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PimcError, match="broken.png"):
        load_images(tmp_path / "imgs")


def test_preprocess_matches_the_shared_resnet20_normalisation():
    x = RNG.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    got = preprocess(x, **CIFAR_NORMALISATION)
    want = ((x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).transpose(0, 3, 1, 2)
    assert got.shape == (2, 3, 4, 4) and got.dtype == np.float32 and np.allclose(got, want, atol=1e-6)
