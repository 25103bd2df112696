"""Reading models and arrays with one-line errors; writing files atomically."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .core.errors import PimcError


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file (external data included) or raise a one-line PimcError."""
    p = Path(path)
    if not p.exists():
        raise PimcError(f"model file '{p}' not found; check the path")
    if not p.is_file():
        raise PimcError(f"'{p}' is not a file; give the path of an .onnx model")
    try:
        model = onnx.load(str(p))
    except DecodeError as e:
        raise PimcError(f"'{p}' is not a readable ONNX model (protobuf decode failed: {e}); re-export it or check that the download is complete")
    except Exception as e:  # onnx raises ValidationError, OSError, ValueError, ... for bad files and external data
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(". ")
        what = "its external data could not be loaded" if "external" in msg.lower() or "TensorProto" in msg else \
            "it could not be read as an ONNX model"
        raise PimcError(f"'{p}': {what}: {msg}; check that the model and its data files are complete and lie "
                        f"in the model's folder")
    if len(model.graph.node) == 0 and not model.graph.output:
        raise PimcError(f"'{p}' holds no ONNX graph (empty or not an ONNX file); give an exported .onnx model")
    return model


def save_onnx_atomic(model: onnx.ModelProto, path: str | Path) -> None:
    """Write ``model`` to ``path`` so that no partial file is ever left behind."""
    write_bytes_atomic(model.SerializeToString(), path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | Path, option: str = "-o", *, directory: bool = False,
                      suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output path that cannot be written: its folder
    missing or not writable, a folder where a file goes (or the reverse), a suffix
    other than ``suffixes``.  The output itself (file, or ``directory``) may be new;
    missing parent folders are never created.  Returns the path."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise PimcError(f"{option}: folder '{parent}' does not exist; create it or choose another {option} path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PimcError(f"{option}: cannot write into folder '{parent}'; choose another {option} path")
    if directory and p.exists() and not p.is_dir():
        raise PimcError(f"{option}: '{p}' is a file; give a folder path")
    if not directory and p.is_dir():
        raise PimcError(f"{option}: '{p}' is a folder; give a file path")
    if suffixes and p.suffix not in suffixes:
        raise PimcError(f"{option}: '{p}' must end in {' or '.join(suffixes)}")
    return p


def write_bytes_atomic(data: bytes, path: str | Path, option: str = "-o") -> None:
    p = check_output_path(path, option)
    parent = p.parent if str(p.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_array_file(path: str | Path, option: str, key_candidates=("x", "inputs", "data")) -> dict[str, np.ndarray]:
    """Load a .npy or .npz of arrays (no pickles); return name -> array.

    A .npy yields {"": array}; an .npz yields all its arrays.
    """
    p = Path(path)
    if not p.is_file():
        raise PimcError(f"{option}: file '{p}' not found")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return {"": np.load(p, allow_pickle=False)}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise PimcError(f"{option}: '{p}' is not a readable .npy/.npz array file: {e}")
