"""Gradients for the PIM math: ``torch.autograd.Function``s whose forward calls the shared
formula (``pimc.core.formulas``) unchanged, so that the training forward is the deployed
IR's math bit for bit, and whose backward is the straight-through estimator (STE) with
learned-step-size (LSQ, Esser et al. 2020) gradients for the scales.

* every ``round`` passes gradients straight through; values clipped by a quantizer get
  none (their scale gets the clip bound instead, as in LSQ).  The pass/block masks are kept
  as float32 0/1 and applied by multiplication (``grad * inside``; a blocked gradient is
  then 0 with the sign of grad * 0, which changes no sum that is not zero; an infinite or NaN
  gradient would no longer be blocked, and ``fit`` stops at a non-finite loss before): torch
  2.13's ``where`` on CPU takes 7-10x the time of a multiplication over a partial-sum-sized tensor;
* a scale's gradient is multiplied by ``1/sqrt(N * Qp)`` (N elements per scale, Qp the
  largest positive level) through :func:`grad_scale`, an identity in the forward;
* splits whose parts are recombined with known coefficients (weight slices, input bit
  planes) are exact in the forward; in the backward each of the n parts takes the share
  1/n of the whole, divided by its coefficient, so that the recombined value's gradient
  is the identity.
"""
from __future__ import annotations

import torch

from pimc.core import formulas as F


def _inside(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """1.0 where lo <= v <= hi, else 0.0 (float32): the quantizer's pass mask."""
    return torch.eq(v.clamp(lo, hi), v, out=torch.empty_like(v))


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` unchanged in the forward (same values, bit for bit); its gradient times ``g``."""
    return _GradScale.apply(x, g)


class QuantizeInput(torch.autograd.Function):
    """q = formulas.quantize_input(x, s): integers; d q/d x = 1/s and d q/d s = -x/s^2 inside the
    range, 0 outside (with the ``s`` that multiplies q downstream, this is LSQ's gradient)."""

    @staticmethod
    def forward(ctx, x, scale, bits: int, signed: int):
        q, v = F.quantize_input_parts(x, scale, bits=bits, signed=signed)
        lo, hi = F.input_range(bits, signed)
        ctx.save_for_backward(v, scale, _inside(v, lo, hi))
        return q

    @staticmethod
    def backward(ctx, grad):
        v, scale, inside = ctx.saved_tensors
        g = grad * inside
        return g / scale, (-(g * v).sum() / scale).reshape(scale.shape), None, None


class QuantizeWeight(torch.autograd.Function):
    """q_w = formulas.quantize_weight(W, s_w) with one scale per output column."""

    @staticmethod
    def forward(ctx, w, scale, bits: int):
        q = F.quantize_weight(w, scale, bits=bits)
        qmax = 2 ** (bits - 1) - 1
        s = scale.reshape(-1, *([1] * (w.dim() - 1)))
        v = w / s
        ctx.save_for_backward(v, s, _inside(v, -qmax, qmax))
        return q

    @staticmethod
    def backward(ctx, grad):
        v, s, inside = ctx.saved_tensors
        g = grad * inside
        gs = -(g * v).sum(dim=tuple(range(1, g.dim()))) / s.reshape(-1)
        return g / s, gs, None


class WeightSlices(torch.autograd.Function):
    """The weight slices (S, ...) of integer weights q: formulas.weight_slices."""

    @staticmethod
    def forward(ctx, q, coef, bits: int, cell_bits: int, differential: bool):
        ctx.save_for_backward(coef)
        return F.weight_slices(q, bits=bits, cell_bits=cell_bits, differential=differential)

    @staticmethod
    def backward(ctx, grad):
        (coef,) = ctx.saved_tensors
        share = (1.0 / (coef.numel() * coef)).reshape(-1, *([1] * (grad.dim() - 1)))
        return (grad * share).sum(0), None, None, None, None


class BitPlanes(torch.autograd.Function):
    """The bit planes of integer inputs q stacked on the batch axis: formulas.bit_planes."""

    @staticmethod
    def forward(ctx, q, bits: int, signed: int):
        ctx.bits, ctx.signed = bits, signed
        return F.bit_planes(q, bits=bits, signed=signed)

    @staticmethod
    def backward(ctx, grad):
        w = torch.as_tensor(F.plane_weights(ctx.bits, ctx.signed), device=grad.device)
        share = (1.0 / (ctx.bits * w)).reshape(ctx.bits, 1, *([1] * (grad.dim() - 1)))
        g = grad.reshape(ctx.bits, -1, *grad.shape[1:]) * share
        return g.sum(0), None, None


class Adc(torch.autograd.Function):
    """One conversion of every partial sum s (P*B, columns, H, W) per column: the ideal ADC
    (``formulas.adc_quantize``) or, with a chip's ``gain``, ``offset``, ``lut`` and noise, the
    non-ideal one (``formulas.adc_quantize_nonideal``).  STE for s inside the code range;
    LSQ for the step Delta (per column); the zero point is fixed."""

    @staticmethod
    def forward(ctx, s, scale, zero_point, bits: int, chip):
        y, v, r, code, clipped = F.adc_quantize_parts(s, scale, zero_point, bits=bits)
        if chip is not None:
            gain, offset, lut, sigma, seed = chip
            y = F.adc_quantize_nonideal(s, scale, zero_point, gain, offset, lut, bits=bits, noise_sigma=sigma,
                                        seed=seed)
        inside = torch.eq(code, clipped, out=torch.empty_like(code))   # 1.0 / 0.0
        if not ctx.needs_input_grad[1]:   # the steps are fixed (TrainConfig.adc_lr 0): no LSQ gradient
            ctx.save_for_backward(inside)
            return y
        # d y / d Delta (the ideal ADC's): round(v) - v inside the code range, the clipped level - z
        # outside (LSQ).  Inside, clipped - z = (round(v) + z) - z is round(v) exactly (small
        # integers), so (clipped - z) - v * inside is both, with the same operations inside
        # (round(v) - v) and an exact x - 0 outside
        ctx.save_for_backward(inside, (clipped - zero_point) - v * inside)
        return y

    @staticmethod
    def backward(ctx, grad):
        inside = ctx.saved_tensors[0]
        gs = grad * inside
        if len(ctx.saved_tensors) == 1:
            return gs, None, None, None, None
        gd = grad * ctx.saved_tensors[1]
        dims = [d for d in range(grad.dim()) if d != 1]
        return gs, gd.sum(dim=dims, keepdim=True), None, None, None


class Recombine(torch.autograd.Function):
    """formulas.recombine (float64 sum of the columns' converted values times their plane and
    slice coefficients) with its gradient computed in float32: d a[p, b, g, k, z] =
    grad[b, g, z] * coef[p, k].  The same values autograd gets through the float64 contraction
    (each is one product of two float32 numbers, exact in float64 and rounded once to float32 by
    either route), without its float64 copies of the partial-sum-sized tensors."""

    @staticmethod
    def forward(ctx, a, coef, planes: int, groups: int, tiles: int, slices: int):
        ctx.dims = (a.shape, planes, groups, tiles, slices)
        ctx.save_for_backward(coef)
        return F.recombine(a, coef, planes=planes, groups=groups, tiles=tiles, slices=slices)

    @staticmethod
    def backward(ctx, grad):
        (coef,) = ctx.saved_tensors
        shape, planes, groups, tiles, slices = ctx.dims
        c = coef.to(torch.float32).reshape(planes, 1, slices).expand(planes, tiles, slices)
        g = grad.to(torch.float32).reshape(1, shape[0] // planes, groups, 1, -1)
        ga = g * c.reshape(planes, 1, 1, tiles * slices, 1)
        return ga.reshape(shape), None, None, None, None, None
