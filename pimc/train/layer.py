"""One mapped layer in PyTorch: the compiled layer's structure (from its mapping record)
over the user module's own weight, with learned scales.

The forward is the IR's math (docs/IR.md, "A mapped layer") on torch tensors, through the
shared formulas: quantize the input, split it into bit planes (bit-serial schemes), quantize
the weight per output column, split it into weight slices, place the slices' cells on the
arrays of each chunk with the indices the emitter uses (``planning.chunk_cells``), run the
chunk's array convolution, convert every column with the (ideal or chip) ADC, recombine in
float64 and sum the chunks.  In training the integer accumulator is scaled by s_x * s_w
(plus the layer's bias) and the user's BatchNorm follows; in eval the layer applies the
compiler's own output affine (``planning.output_affine``, BatchNorm folded with
``planning.bn_affine``) and the BatchNorm module is bypassed, so that eval outputs equal the
deployed IR's bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF

from pimc.core import formulas as F
from pimc.core.chip import ChipConfig, draw_layer, transfer_lut
from pimc.core.planning import adc_params, bn_affine, chunk_cells, frozen_range, output_affine, plan_from_mapping
from .autograd import Adc, BitPlanes, QuantizeInput, QuantizeWeight, Recombine, WeightSlices, grad_scale


class BnGate(nn.Module):
    """Stands where the user's BatchNorm after a mapped layer was: runs it in training and
    passes its input through in eval (the mapped layer applies it, folded, itself)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(x) if self.training else x


class _Chunk:
    """Index data of one chunk (constant tensors; not parameters)."""

    def __init__(self, ca, suffix: str):
        self.gather = None if ca.gather is None else torch.as_tensor(ca.gather)
        self.zero_channel = ca.zero_channel
        self.cells = torch.as_tensor(ca.weight)                 # flat slice index per cell, -1 = zero
        self.groups = ca.groups
        self.columns = torch.as_tensor(ca.columns)
        self.coef = torch.as_tensor(ca.coef)
        self.recombine = ca.recombine
        self.suffix = suffix
        self.factor = None                                      # device variation: float64 cell factors


class PimLayer(nn.Module):
    """A mapped Conv2d / Linear of the user's module.  ``mapping``: its LayerMapping;
    ``index``: its position in the mapping (chip draws are per position); ``config``: the
    CompileConfig it was compiled with; ``bn``: the BatchNorm folded into its output, if any."""

    def __init__(self, inner: nn.Module, mapping, index: int, config, bn: nn.BatchNorm2d | None = None,
                 train_adc_bits: int | None = None, rescale: bool = False):
        super().__init__()
        L = mapping
        self.inner, self.name, self.index, self.mapping = inner, L.name, index, L
        self.bn = bn
        self.kind = L.kind
        iq, wq = L.input_quant, L.weight_quant
        self.in_bits, self.in_signed = iq.bits, int(iq.signed)
        self.w_bits = wq.bits
        self.input_scale = nn.Parameter(torch.tensor(np.float32(iq.scale)))
        self.weight_scale = nn.Parameter(torch.as_tensor(np.asarray(wq.scales, np.float32)).clone())
        self.cell_bits, self.differential = config.cell_bits, config.differential_weights
        kh, kw = L.kernel
        self.kernel = (kh, kw)
        self.conv = dict(stride=tuple(L.strides), dilation=tuple(L.dilations))
        t, l, b, r = L.pads if len(L.pads) == 4 else (0, 0, 0, 0)
        self.pad4 = None if (t == b and l == r) else (l, r, t, b)
        self.padding = (t, l) if self.pad4 is None else (0, 0)
        self.group = L.group
        self.rescale = rescale
        self.register_buffer("rho", torch.tensor(1.0))           # EMA of the PIM-QAT rescaling factor
        self.tiled = L.tiling is not None
        self.adc = L.adc is not None
        self.chip = None
        if self.tiled:
            plan = plan_from_mapping(L)
            self.planes, self.bit_serial = plan.n_planes, bool(L.slicing and L.slicing.bit_serial)
            self.slice_coef = torch.as_tensor(np.asarray(L.slicing.slice_coef, np.float32)) if L.slicing else None
            chunks = L.chunk_list
            self.chunks = [_Chunk(ca, c.suffix) for ca, c in zip(chunk_cells(plan), chunks)]
            self.tiles_per_chunk = [c.tiles[1] - c.tiles[0] for c in chunks]
            self.slices_per_chunk = [c.slices[1] - c.slices[0] for c in chunks]
            self.cell_shape = (L.tiling.channels_per_tile, kh, kw)
        if self.adc:
            self.deploy_adc_bits = L.adc.bits
            self.adc_bits = train_adc_bits or L.adc.bits
            step = np.asarray(L.adc.step, np.float32)
            zp = np.asarray(L.adc.zero_point, np.float32)
            if self.adc_bits != self.deploy_adc_bits:   # adjusted precision: the same range, finer steps
                lo, hi = frozen_range(step, zp, self.deploy_adc_bits)
                step, zp = adc_params(lo.astype(np.float64), hi.astype(np.float64), self.adc_bits)
            self.adc_step = nn.Parameter(torch.as_tensor(step).clone())
            # the starting steps: the optimizer moves adc_step relative to them (TrainConfig.adc_lr); not in
            # the state dict (preparation from the same mapping sets them again, so a resumed run uses the same)
            self.register_buffer("adc_step_start", torch.as_tensor(step).clone(), persistent=False)
            self.register_buffer("adc_zero_point", torch.as_tensor(zp).clone())

    # ---- values -------------------------------------------------------------------
    def weight(self) -> torch.Tensor:
        """The float weight as (Cout, cin_g, kh, kw)."""
        w = self.inner.weight
        return w.reshape(w.shape[0], -1, 1, 1) if self.kind == "fc" else w

    def deployed_adc(self) -> tuple[np.ndarray, np.ndarray]:
        """(Delta, z) per column at the deployed ADC bits: the learned steps (at least 1); with
        adjusted precision the learned range [-z Delta, (2^B-1-z) Delta] re-derived at the
        deployed bits (``adc_params``)."""
        step = np.maximum(self.adc_step.detach().cpu().numpy().astype(np.float32), np.float32(1))
        zp = self.adc_zero_point.cpu().numpy().astype(np.float32)
        if self.adc_bits == self.deploy_adc_bits:
            return step, zp
        lo, hi = frozen_range(step, zp, self.adc_bits)
        return adc_params(lo.astype(np.float64), hi.astype(np.float64), self.deploy_adc_bits)

    def output_affine(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(out_scale, out_bias) of the deployed layer, from the current values, exactly as the
        compiler computes them (``--fold-bn output``; the rescaling EMA folded into s_w)."""
        cout = self.mapping.cout
        scale, shift = np.ones(cout, np.float32), None
        if self.bn is not None:
            bn = self.bn
            s, t = bn_affine(*(v.detach().cpu().numpy() for v in (bn.weight, bn.bias, bn.running_mean,
                                                                    bn.running_var)), bn.eps)
            scale, shift = s.astype(np.float32), t.astype(np.float32)
        bias = None if self.inner.bias is None else self.inner.bias.detach().cpu().numpy().astype(np.float32)
        out_scale, _ = output_affine(float(self.input_scale.detach()), self.deployed_weight_scale(), scale, None,
                                     None, self.deployed_rescale())
        _, out_bias = output_affine(1.0, np.ones(cout, np.float32), scale, bias, shift)
        return out_scale, out_bias

    def deployed_weight_scale(self) -> np.ndarray:
        return self.weight_scale.detach().cpu().numpy().astype(np.float32)

    def deployed_rescale(self) -> float | None:
        """The rescaling EMA as float32 (None without rescaling: out_scale unchanged)."""
        return float(np.float32(self.rho.item())) if self.rescale else None

    # ---- chips ----------------------------------------------------------------------
    def set_chip(self, chip: ChipConfig | None) -> None:
        """Use chip ``chip``'s draws (``draw_layer``, as ``instantiate`` writes them), or the ideal
        ADC and cells (None or an ideal config)."""
        self.chip = None
        if self.tiled:
            for c in self.chunks:
                c.factor = None
        if chip is None or chip.ideal or not self.tiled:
            return
        draw = draw_layer(chip, self.index, self.mapping.adc.columns if self.adc else 0, self.cell_shape,
                          len(self.chunks))
        if draw.log_factor is not None:
            lf = draw.log_factor
            for c in self.chunks:
                width = c.cells.shape[1]
                c.factor = torch.as_tensor(np.exp(lf[c.columns.numpy()][:, :width] if np.ndim(lf) else
                                                  np.full((len(c.columns), width, *self.kernel), lf)))
        if chip.adc == "nonideal" and self.adc:
            self.chip = dict(gain=torch.as_tensor(draw.gain), offset=torch.as_tensor(draw.offset),
                             lut=torch.as_tensor(transfer_lut(chip, self.adc_bits)), sigma=float(chip.noise_sigma),
                             seeds=draw.noise_seeds)

    # ---- forward --------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = None
        if self.kind == "fc":
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1], 1, 1)
        n_in = x[0].numel()
        qp = max(1.0, F.input_range(self.in_bits, self.in_signed)[1])
        sx = grad_scale(self.input_scale, 1.0 / math.sqrt(n_in * qp))
        q = QuantizeInput.apply(x, sx, self.in_bits, self.in_signed)
        qmax = 2 ** (self.w_bits - 1) - 1
        w = self.weight()
        sw = grad_scale(self.weight_scale, 1.0 / math.sqrt(w[0].numel() * max(qmax, 1)))
        qw = QuantizeWeight.apply(w, sw, self.w_bits)
        acc = self._integer_core(q, qw) if self.tiled else self._conv(q, qw, self.group)
        if self.training:
            y = acc * (sx * sw).reshape(1, -1, 1, 1)
            if self.inner.bias is not None:
                y = y + self.inner.bias.reshape(1, -1, 1, 1)
        else:
            out_scale, out_bias = self.output_affine()
            y = acc * torch.as_tensor(out_scale).reshape(1, -1, 1, 1)
            if out_bias is not None:
                y = y + torch.as_tensor(out_bias).reshape(1, -1, 1, 1)
        if lead is not None:
            y = y.reshape(*lead, -1)
        return y

    def _conv(self, h, w, groups):
        if self.pad4 is not None:
            h = TF.pad(h, self.pad4)
        return TF.conv2d(h, w, None, padding=self.padding, groups=groups, **self.conv)

    def chunk_cells(self, qw: torch.Tensor) -> list[torch.Tensor]:
        """Each chunk's array cells from the integer weights ``qw``: sliced
        (``formulas.weight_slices``, STE shares) and placed where the emitter places them."""
        if self.slice_coef is not None:
            slices = WeightSlices.apply(qw, self.slice_coef, self.w_bits, self.cell_bits, self.differential)
        else:
            slices = qw[None]
        flat = torch.cat([slices.reshape(-1), slices.new_zeros(1)])     # index -1: a zero cell
        return [flat[c.cells] for c in self.chunks]

    #: at most this many elements (rows x columns x pixels) in one chunk's partial sums: larger
    #: batches run in sub-batches (the ADC, rescaling moments and recombination are chains of
    #: elementwise passes; bit-serial ResNet-20 at batch 128, 128M elements per tensor, took
    #: 2.4x the time of sub-batches under 4M; native and differential stay one batch)
    sub_batch_elements = 2 ** 22

    def _integer_core(self, q, qw):
        weights = []
        for c, w in zip(self.chunks, self.chunk_cells(qw)):
            weights.append(w if c.factor is None else (w.double() * c.factor).float())
        rows = q.shape[0]
        per_image = self.planes * max(len(c.columns) for c in self.chunks) * q.shape[2] * q.shape[3] // (
            self.conv["stride"][0] * self.conv["stride"][1])
        sub = max(1, self.sub_batch_elements // max(per_image, 1))
        parts, stats = [], []
        for i in range(0, rows, sub):   # images are independent: same values as one pass over the batch
            # (one sub-batch: q itself, not a slice, whose backward would zero-fill and copy q's gradient)
            a, st = self._core(q if sub >= rows else q[i:i + sub], weights, rows)
            parts.append(a)
            stats += st
        acc = parts[0] if len(parts) == 1 else torch.cat(parts)
        if stats:   # training: this batch's factor (eval: its EMA, in the output affine)
            acc = acc * self._rho(stats)
        return acc

    def _core(self, q, weights, batch_rows: int):
        """The chunks' array convolutions, conversions and recombination for images ``q`` of a
        batch of ``batch_rows`` (the ADC steps' gradient scale counts the whole batch)."""
        h = BitPlanes.apply(q, self.in_bits, self.in_signed) if self.bit_serial else q
        padded = None
        parts, stats = [], []
        for ci, (c, w) in enumerate(zip(self.chunks, weights)):
            hin = h
            if c.gather is not None:
                if c.zero_channel:
                    if padded is None:
                        padded = TF.pad(h, (0, 0, 0, 0, 0, 1))
                    hin = padded.index_select(1, c.gather)
                else:
                    hin = h.index_select(1, c.gather)
            s = self._conv(hin, w, c.groups)
            a = s
            if self.adc:
                step = torch.clamp(self.adc_step, min=1.0)
                n = (s.numel() // s.shape[1]) * batch_rows // q.shape[0]
                step = grad_scale(step, 1.0 / math.sqrt(n * (2 ** self.adc_bits - 1)))[c.columns].reshape(1, -1, 1, 1)
                zp = self.adc_zero_point[c.columns].reshape(1, -1, 1, 1)
                chip = None
                if self.chip is not None:
                    chip = (self.chip["gain"][c.columns].reshape(1, -1, 1, 1),
                            self.chip["offset"][c.columns].reshape(1, -1, 1, 1), self.chip["lut"],
                            self.chip["sigma"], self.chip["seeds"][ci])
                a = Adc.apply(s, step, zp, self.adc_bits, chip)
                if self.rescale and self.training:
                    stats.append(_moments(s.detach(), a.detach()))
            if c.recombine:
                a = Recombine.apply(a, c.coef, self.planes, self.group, self.tiles_per_chunk[ci],
                                    self.slices_per_chunk[ci])
            parts.append(a)
        acc = parts[0]
        for p in parts[1:]:
            acc = acc + p
        return acc, stats

    def _rho(self, stats) -> torch.Tensor:
        """PIM-QAT's rescaling: rho = std(s) / std(ADC(s)) over the layer's partial sums of this
        batch (detached); its EMA is what eval and the export use."""
        tot = torch.stack(stats).sum(0)
        n, s1, s2, a1, a2 = tot
        var_s = s2 / n - (s1 / n) ** 2
        var_a = a2 / n - (a1 / n) ** 2
        rho = torch.sqrt(var_s / var_a) if var_a > 0 else torch.tensor(1.0, dtype=torch.float64)
        self.rho.mul_(0.9).add_(0.1 * rho.float())
        return rho.float()


def _moments(s, a) -> torch.Tensor:
    """(n, sum s, sum s^2, sum a, sum a^2) in float64.  The squares' sums are dot products of the
    float64 copies (half the memory passes of squaring first; float32 values square exactly in
    float64, and the integer partial sums s sum exactly in any order)."""
    s, a = s.double().reshape(-1), a.double().reshape(-1)
    return torch.stack([torch.tensor(float(s.numel()), dtype=torch.float64), s.sum(), torch.dot(s, s), a.sum(),
                        torch.dot(a, a)])
