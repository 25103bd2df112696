"""Image-classification data in the formats users already have, read safely.

``load_images(path, split)`` returns ``(x, y)`` with x uint8 (N, H, W, C) and y
int64 (N,), from:

* the official CIFAR-10 / CIFAR-100 python directories (``cifar-10-batches-py/``:
  ``data_batch_1..5`` = train, ``test_batch`` = test; ``cifar-100-python/``:
  ``train``, ``test`` with fine labels).  The batch files are pickles: they are
  read with an unpickler that accepts only plain containers, bytes, numbers and
  numpy arrays (numpy's array reconstruction and dtype), never arbitrary objects;
* an ``.npz`` with ``x`` (N, H, W, C uint8) and ``y`` (or ``x_train``/``y_train``,
  ``x_test``/``y_test`` for the splits);
* a folder with one sub-folder of images per class (class index = sorted folder
  order; ``split`` sub-folders ``train/`` and ``test/`` are used when present);
  needs Pillow (``pip install 'pimc[images]'``).

``preprocess`` turns them into model inputs (scale, per-channel mean and std,
NCHW float32); ``CIFAR_NORMALISATION`` is the one of the shared ResNet-20.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from .core.errors import PimcError

CIFAR_NORMALISATION = {"scale": 1 / 255, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "layout": "NCHW"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class _SafeUnpickler(pickle.Unpickler):
    """Only numpy array reconstruction; everything else a pickle may name is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as e:
        raise PimcError(f"'{path}': not a readable CIFAR batch file ({e}); re-download the data set")
    if not isinstance(d, dict):
        raise PimcError(f"'{path}': not a CIFAR batch (a {type(d).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batches(files: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        d = _read_batch(f)
        if "data" not in d or label_key not in d:
            raise PimcError(f"'{f}': a CIFAR batch needs 'data' and '{label_key}' (found: {', '.join(map(str, d))})")
        data = np.asarray(d["data"])
        labels = np.asarray(d[label_key], np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise PimcError(f"'{f}': 'data' must be uint8 (N, 3072), got {data.dtype} {list(data.shape)}")
        if labels.shape != (data.shape[0],):
            raise PimcError(f"'{f}': {data.shape[0]} images but {labels.shape[0]} labels")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def load_images(path: str | Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    if split not in ("train", "test"):
        raise PimcError(f"split '{split}' is not train or test")
    if not p.exists():
        raise PimcError(f"data '{p}' not found; give a CIFAR python directory, an .npz or an image folder")
    if p.is_file():
        if p.suffix != ".npz":
            raise PimcError(f"data '{p}': a file must be an .npz with x and y")
        return _load_npz(p, split)
    if (p / "test_batch").is_file() or (p / "data_batch_1").is_file():
        files = [p / "test_batch"] if split == "test" else [p / f"data_batch_{i}" for i in range(1, 6)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PimcError(f"data '{p}': CIFAR-10 directory lacks {', '.join(missing)}")
        return _cifar_batches(files, "labels")
    if (p / "test").is_file() and (p / "meta").is_file() or (p / "train").is_file() and (p / "meta").is_file():
        f = p / split
        if not f.is_file():
            raise PimcError(f"data '{p}': CIFAR-100 directory lacks '{split}'")
        return _cifar_batches([f], "fine_labels")
    return _load_folder(p / split if (p / split).is_dir() else p, p)


def has_splits(path: str | Path) -> bool:
    """Whether ``path`` holds separate train and test splits (else both splits read the same images)."""
    p = Path(path)
    if p.is_file():
        try:
            with np.load(p, allow_pickle=False) as z:
                return {"x_train", "x_test"} <= set(z.files) and not {"x", "y"} <= set(z.files)
        except (ValueError, OSError, EOFError):
            return False
    return (p / "test_batch").is_file() or (p / "meta").is_file() or ((p / "train").is_dir() and (p / "test").is_dir())


def _load_npz(p: Path, split: str):
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            xk, yk = ("x", "y") if {"x", "y"} <= keys else (f"x_{split}", f"y_{split}")
            if not {xk, yk} <= keys:
                raise PimcError(f"data '{p}': needs arrays x and y (or x_{split}, y_{split}); found {', '.join(sorted(keys))}")
            x, y = z[xk], z[yk]
    except (ValueError, OSError, EOFError) as e:
        raise PimcError(f"data '{p}': not a readable .npz ({e})")
    if x.ndim != 4 or x.dtype != np.uint8:
        raise PimcError(f"data '{p}': x must be uint8 (N, H, W, C), got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise PimcError(f"data '{p}': {x.shape[0]} images but y has shape {list(y.shape)}")
    return x, y.astype(np.int64)


def _load_folder(d: Path, root: Path):
    classes = sorted(c for c in d.iterdir() if c.is_dir())
    if not classes:
        raise PimcError(f"data '{root}': not a CIFAR directory, and no class sub-folders of images in '{d}'")
    try:
        from PIL import Image
    except ImportError:
        raise PimcError("reading an image folder needs Pillow: pip install 'pimc[images]'")
    xs, ys = [], []
    for label, c in enumerate(classes):
        for f in sorted(c.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("RGB"), np.uint8))
            except (OSError, ValueError) as e:
                raise PimcError(f"data '{f}': unreadable image ({e}); remove or replace it")
            ys.append(label)
    if not xs:
        raise PimcError(f"data '{d}': the class folders hold no images")
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise PimcError(f"data '{d}': images differ in size ({', '.join(map(str, sorted(shapes)[:3]))}); resize them first")
    return np.stack(xs), np.array(ys, np.int64)


def preprocess(x: np.ndarray, scale: float = 1 / 255, mean=(0.0,), std=(1.0,), layout: str = "NCHW") -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 model inputs: x*scale, minus mean, over std, per channel."""
    channels = x.shape[-1] if x.ndim else 0
    for option, v in (("--mean", mean), ("--std", std)):
        n = len(np.atleast_1d(v))
        if n not in (1, channels):
            raise PimcError(f"{option}: {n} values for images with {channels} channels; give one value per channel "
                            f"(or one for all)")
    x = x.astype(np.float32) * np.float32(scale)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    elif layout != "NHWC":
        raise PimcError(f"layout '{layout}' is not NCHW or NHWC")
    return np.ascontiguousarray(x, np.float32)


PREPROCESS_DEFAULTS = {"scale": 1 / 255, "mean": [0.0], "std": [1.0], "layout": "NCHW"}


def model_preprocess(model_path) -> dict | None:
    """The preprocessing recorded in a model's metadata (key ``pimc.preprocess``:
    JSON with scale, mean, std, layout), or None."""
    import json

    import onnx
    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # the command that loads the model reports a bad file properly
        return None
    meta = {p.key: p.value for p in m.metadata_props}
    if "pimc.preprocess" not in meta:
        return None
    try:
        d = json.loads(meta["pimc.preprocess"])
        return {"scale": float(d["scale"]), "mean": [float(v) for v in d["mean"]], "std": [float(v) for v in d["std"]],
                "layout": str(d.get("layout", "NCHW"))}
    except (ValueError, KeyError, TypeError):
        raise PimcError(f"'{model_path}': metadata pimc.preprocess is not JSON with scale, mean, std, layout")

