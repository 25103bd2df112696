"""Opening onnxruntime sessions on compiled (or plain) models."""
from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from pimc.core import names as N
from pimc.core.errors import PimcError

ort.set_default_logger_severity(3)


# onnxruntime folds a constant Mul/Add that follows a Conv into the Conv's
# weights.  That is valid float math but makes the integer accumulator inexact,
# so the digital quantized model would no longer match a lossless PIM model bit
# for bit.  pimc sessions keep the dequantization where the IR puts it.
EXACTNESS_DISABLED_OPTIMIZERS = ("ConvMulFusion", "ConvAddFusion", "ConvBNFusion")
# The array convolutions of a PIM model feed pimc's ADC ops, which read NCHW:
# onnxruntime's blocked (NCHWc) convolution then needs a reorder of its large
# output, and measured 10-15 % slower overall on ResNet-20 than the plain path.


def open_session(model, chip=None, *, chip_seed: int | None = None, threads: int = 0,
                 native: bool | None = None, fusions: bool = False, quiet: bool = False,
                 priority_order: bool = False, fuse: bool = True,
                 disabled: list[str] | tuple | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session on a PIM IR model (path, bytes or ModelProto).

    ``chip``: None or "ideal" (the compiled ideal model), "nonideal" (the
    non-ideal ADC with the PIM-QAT chip defaults), a chip preset name, or a
    :class:`~pimc.core.chip.ChipConfig`; ``chip_seed`` picks the chip
    instance.  A plain ONNX model opens the same way when no chip is asked for.
    The IR ops run through the native kernel library when it can be built
    (``native`` None), must (True), or never (False: the function bodies).
    The Conv-affine fusions in ``EXACTNESS_DISABLED_OPTIMIZERS`` are disabled
    (see there), and for PIM models the blocked-layout transformer (see
    ``names.ARRAY_READER_OPS``); a plain onnxruntime session runs the same model with
    results equal up to float rounding.  ``fusions=True`` leaves every onnxruntime graph
    optimization on, as in a default session: for runs of the source float model (activation
    and ADC-range calibration, the batch check on import), which observe the model as a user's
    default session computes it.  ``quiet`` silences onnxruntime's own error log (for callers
    to whom a failing run is an answer).  ``priority_order``: onnxruntime's priority-based
    execution order, for calibration runs that reduce many large tensors to a few numbers
    (its default order kept every probed tensor of ResNet-20, bit-serial W8 with 1-bit cells,
    alive to the end of the run: 7.9 GiB at batch 64 instead of 0.9 GiB).  ``fuse``: with the
    native library, each layer chunk's array conv and ADC run as one fused op with integer
    arithmetic (pimc.runtime.fuse; same values); False keeps them apart.  ``disabled``: the
    graph optimizers to switch off instead of those ``disabled_optimizers`` names for this model
    (a probe that stands for a session on another model).  Every pimc session is opened here.
    """
    from pimc.core.chip import CHIP_PRESETS, ChipConfig, build_chip_config
    from .chip import instantiate

    source = str(model) if isinstance(model, (str, Path)) else "model"
    proto = _load(model)
    if chip is not None or chip_seed is not None:
        if chip is None or chip == "ideal":
            cfg = build_chip_config(adc="ideal", chip_seed=chip_seed)
        elif isinstance(chip, ChipConfig):
            cfg = chip if chip_seed is None else ChipConfig(**{**chip.__dict__, "chip_seed": chip_seed})
        elif chip in CHIP_PRESETS:
            cfg = build_chip_config(preset=chip, chip_seed=chip_seed)
        elif chip == "nonideal":
            cfg = build_chip_config(adc="nonideal", chip_seed=chip_seed)
        else:
            raise PimcError(f"chip: '{chip}' is not ideal, nonideal, a chip preset or a ChipConfig")
        proto = instantiate(proto, cfg, source)
    so = ort.SessionOptions()
    so.log_severity_level = 4 if quiet else 3
    if priority_order:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        so.intra_op_num_threads = threads
    if native is not False:
        from .native import native_library
        lib = native_library()
        if lib is not None:
            so.register_custom_ops_library(str(lib))
            if fuse:
                from .fuse import fuse_array_ops
                proto, _ = fuse_array_ops(proto, source)
        elif native:
            raise PimcError("native kernels were requested but are unavailable (see the note above)")
    disabled = disabled_optimizers(proto, fusions) if disabled is None else list(disabled)
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled)
    except Exception as e:  # onnxruntime raises its own exception types
        raise PimcError(f"onnxruntime could not open '{source}': {str(e).splitlines()[0]}")


def disabled_optimizers(proto: onnx.ModelProto, fusions: bool = False) -> list[str]:
    """The onnxruntime graph optimizers a pimc session on ``proto`` disables (see
    ``open_session``): also what the float ops of the model compute in it depends on (the
    blocked layout changes the order of pooling sums: pimc.train.pooling)."""
    if fusions:
        return []
    disabled = list(EXACTNESS_DISABLED_OPTIMIZERS)
    if any(n.domain == N.DOMAIN and n.op_type in N.ARRAY_READER_OPS for n in proto.graph.node):
        disabled.append("NchwcTransformer")
    return disabled


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    from pimc.io import load_onnx
    return load_onnx(model)


def fixed_batch(model) -> int | None:
    """The static batch a model's first input demands (an onnxruntime session or a
    ModelProto), or None when its batch dimension is symbolic (any batch runs)."""
    if isinstance(model, onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        ins = [i for i in model.graph.input if i.name not in inits]
        dims = ins[0].type.tensor_type.shape.dim if ins else []
        return dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value else None
    shape = model.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def run_batches(sess: ort.InferenceSession, names, feed: dict, batch: int, *, trim: bool = True):
    """Run ``feed`` (name -> array, one row per sample) through ``sess`` in batches of
    ``batch`` rows; yield (first row, rows, outputs) per batch.  A model with a fixed
    batch (``fixed_batch``) gets batches of exactly that size, the last padded with
    copies of its last row; with ``trim`` the padded rows are cut off outputs whose
    leading dimension is the batch (keep ``trim`` off for reductions over the batch)."""
    import numpy as np
    fixed = fixed_batch(sess)
    step = fixed or max(1, int(batch))
    n = len(next(iter(feed.values())))
    for i in range(0, n, step):
        part = {k: v[i:i + step] for k, v in feed.items()}
        rows = len(next(iter(part.values())))
        if fixed and rows < fixed:
            part = {k: np.concatenate([v, np.repeat(v[-1:], fixed - rows, axis=0)]) for k, v in part.items()}
        out = sess.run(names, part)
        if fixed and rows < fixed and trim:
            out = [o[:rows] if o.ndim and o.shape[0] == fixed else o for o in out]
        yield i, rows, out
