"""Opening onnxruntime sessions on compiled (or plain) models."""
from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from pimc.errors import PimcError

ort.set_default_logger_severity(3)


# onnxruntime folds a constant Mul/Add that follows a Conv into the Conv's
# weights.  That is valid float math but makes the integer accumulator inexact,
# so the digital quantized model would no longer match a lossless PIM model bit
# for bit.  pimc sessions keep the dequantization where the IR puts it.
EXACTNESS_DISABLED_OPTIMIZERS = ("ConvMulFusion", "ConvAddFusion", "ConvBNFusion")


def open_session(model, *, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session on a PIM IR model (path, bytes or ModelProto).

    The IR ops run through their model-local function bodies; a plain ONNX
    model opens the same way.  The Conv-affine fusions listed in
    ``EXACTNESS_DISABLED_OPTIMIZERS`` are disabled (see there); a plain
    onnxruntime session runs the same model with results equal up to float
    rounding.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        data = bytes(model)
    else:
        p = Path(model)
        if not p.is_file():
            raise PimcError(f"model file '{p}' not found")
        data = p.read_bytes()
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(EXACTNESS_DISABLED_OPTIMIZERS))
    except Exception as e:  # onnxruntime raises its own exception types
        raise PimcError(f"onnxruntime could not open the model: {str(e).splitlines()[0]}")
