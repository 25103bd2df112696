"""Whole-plane average pooling summed in onnxruntime's order.

The mapped layers compute what the IR computes; the user's module computes the rest (ReLU,
residual adds, flatten: exact in any order) except pooling, whose float32 sum torch and
onnxruntime take in different orders.  Where the next layer's input lies on a rounding
boundary, an ulp moves its integer input and, on a noisy chip, the noise draws that follow.

onnxruntime's CPU ``GlobalAveragePool`` (what the TorchScript exporter writes for
``adaptive_avg_pool2d(x, 1)``) and ``AveragePool`` over the whole plane sum in one of two
orders, measured with onnxruntime 1.31 on x86-64: in the blocked layout (the NCHWc
transformer, for channel counts that are a multiple of the CPU's block, where a session
enables it) each plane's values one after the other ("sequential"); otherwise in four
lanes (value i into lane i mod 4; the lanes added as (l0 + l2) + (l1 + l3); the values
past the last full four added after, in order: "lanes4").  Both then divide by the count.
torch's kernels differ from either by an ulp on about two thirds of the outputs.

Which order a pimc session on the compiled model takes is asked of onnxruntime itself
(:func:`onnxruntime_order`: one pooling node, opened with the optimizers that session
disables, on a probe input), once per shape.  :class:`OrtPooling`, active during
``QatModel.forward`` in eval mode (where outputs equal the IR's), computes these calls in that
order; training keeps torch's pooling (the mode's Python dispatch of every torch call costs
10-40 % of a training step).  Other pooling (windows smaller
than the plane, padding, ``torch.mean``, which exports to ``ReduceMean``) stays torch's own.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as TF
from torch.overrides import TorchFunctionMode


def _sum_sequential(v: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(v.shape[:2], dtype=v.dtype)
    for i in range(v.shape[2]):
        acc = acc + v[:, :, i]
    return acc


def _sum_lanes4(v: torch.Tensor) -> torch.Tensor:
    n = v.shape[2]
    full = n - n % 4
    lanes = torch.zeros((*v.shape[:2], 4), dtype=v.dtype)
    for i in range(0, full, 4):
        lanes = lanes + v[:, :, i:i + 4]
    acc = (lanes[..., 0] + lanes[..., 2]) + (lanes[..., 1] + lanes[..., 3])
    for i in range(full, n):
        acc = acc + v[:, :, i]
    return acc


ORDERS = {"sequential": _sum_sequential, "lanes4": _sum_lanes4}


class _PlaneMean(torch.autograd.Function):
    """(N, C, H, W) -> (N, C, 1, 1): the float32 sum over H*W in ``order``, divided by H*W;
    gradient: the mean's (upstream / (H*W) on every input)."""

    @staticmethod
    def forward(ctx, x, order):
        ctx.shape = x.shape
        v = x.reshape(*x.shape[:2], -1)
        return (ORDERS[order](v) / v.shape[2]).reshape(*x.shape[:2], 1, 1)

    @staticmethod
    def backward(ctx, g):
        n = ctx.shape[2] * ctx.shape[3]
        return (g / n).expand(ctx.shape), None


def plane_mean(x: torch.Tensor, order: str = "sequential") -> torch.Tensor:
    """Mean over each (H, W) plane of a float32 (N, C, H, W) tensor, summed in ``order``
    ("sequential" or "lanes4", see the module's doc)."""
    return _PlaneMean.apply(x, order)


@functools.lru_cache(maxsize=None)
def onnxruntime_order(disabled: tuple, channels: int, height: int, width: int) -> str | None:
    """The order ("sequential" / "lanes4") in which onnxruntime's GlobalAveragePool sums a
    (channels, height, width) input in a session with the optimizers ``disabled`` switched off;
    None when neither matches it (an onnxruntime that sums another way)."""
    from onnx import TensorProto, helper
    from pimc.runtime.session import open_session
    shape = [8, channels, height, width]
    g = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = open_session(m, native=False, disabled=disabled)
    x = np.random.default_rng(0).lognormal(0.0, 2.0, shape).astype(np.float32)   # wide range: orders differ
    y = sess.run(None, {"x": x})[0]
    t = torch.from_numpy(x)
    for order in ORDERS:
        if np.array_equal(plane_mean(t, order).numpy(), y):
            return order
    return None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _whole_plane_adaptive(x, output_size) -> bool:
    return _pair(output_size) == (1, 1)


def _whole_plane_avg(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                     divisor_override=None) -> bool:
    k = _pair(kernel_size)
    s = k if stride is None or stride == [] else _pair(stride)
    return (k == tuple(x.shape[-2:]) and s[0] >= k[0] and s[1] >= k[1] and _pair(padding) == (0, 0)
            and divisor_override is None)


class OrtPooling(TorchFunctionMode):
    """Inside: ``F.adaptive_avg_pool2d(x, 1)`` and ``F.avg_pool2d`` over the whole plane (no
    padding) of float32 4-D tensors compute :func:`plane_mean` in the order onnxruntime takes
    in a session with the optimizers ``disabled`` switched off (``runtime.session.disabled_optimizers``
    of the compiled model)."""

    def __init__(self, disabled=()):
        super().__init__()
        self.disabled = tuple(disabled)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        test = _WHOLE_PLANE.get(func)
        if test is not None:
            x = args[0] if args else kwargs.get("input")
            rest = {k: v for k, v in kwargs.items() if k != "input"}
            if (isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype == torch.float32
                    and test(x, *args[1:], **rest)):
                order = onnxruntime_order(self.disabled, *x.shape[1:])
                if order is not None:
                    return plane_mean(x, order)
                _warn_unknown()
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _warn_unknown():
    warnings.warn("this onnxruntime sums average pooling in an order pimc does not know: torch's pooling "
                  "is used, and eval outputs may differ from the deployed IR's by an ulp there")


_WHOLE_PLANE = {TF.adaptive_avg_pool2d: _whole_plane_adaptive, TF.avg_pool2d: _whole_plane_avg}
