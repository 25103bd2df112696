"""The PIM IR op library (domain ``ai.pimc``, version 1).

One place per op: its schema (inputs, attributes), its ONNX function body made
of standard ops (so that any onnxruntime and the ONNX reference evaluator run a
compiled model with nothing registered), and a numpy implementation of the same
formula.  docs/IR.md states each op's semantics; keep the three in step.

Every value is float32 holding integers where the formula says so: partial sums
of small integers are exact in float32 up to 2^24 (see the background notes).
Rounding is round-half-to-even everywhere (ONNX ``Round``, ``numpy.round``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx.parser

from pimc.core.names import DOMAIN, DOMAIN_VERSION  # noqa: E402  (re-exported)
# The numpy formula of each op is the core's (pimc.core.formulas), which runs on numpy
# and torch alike; the names below are the ones the op table and the tests use.
from pimc.core.formulas import (KEY_VALUES, adc_quantize as adc_quantize_np,  # noqa: E402,F401
                                adc_quantize_nonideal as adc_quantize_nonideal_np,
                                adc_recombine as adc_recombine_np,
                                adc_recombine_nonideal as adc_recombine_nonideal_np,
                                bit_planes as bit_planes_np, input_range, mix2, mix32, plane_weights,
                                quantize_input as quantize_input_np, recombine as recombine_np,
                                row_keys as row_keys_np, thermal_noise as thermal_noise_np, transfer as transfer_np)
BODY_OPSET = 17  # opset of the standard ops used inside the function bodies


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attributes: tuple[str, ...]
    body: str  # ONNX textual function body
    numpy: Callable
    uses: tuple[str, ...] = ()  # other IR ops its body calls

    def function_proto(self) -> onnx.FunctionProto:
        imports = f'"" : {BODY_OPSET}' + (f', "{DOMAIN}" : {DOMAIN_VERSION}' if self.uses else "")
        text = (f'<domain: "{DOMAIN}", opset_import: [{imports}]>\n'
                f'{self.name} <{", ".join(self.attributes)}>({", ".join(self.inputs)}) => (y) {{\n{self.body}\n}}')
        return onnx.parser.parse_function(text)


# ---------------------------------------------------------------- QuantizeInput
QUANTIZE_INPUT = OpDef(
    "QuantizeInput", ("x", "scale"), ("bits", "signed"),
    """
  b = Constant <value_int: int = @bits> ()
  sg = Constant <value_int: int = @signed> ()
  bf = Cast <to = 1> (b)
  sf = Cast <to = 1> (sg)
  one = Constant <value_float = 1.0> ()
  two = Constant <value_float = 2.0> ()
  full = Pow (two, bf)
  bm1 = Sub (bf, one)
  half = Pow (two, bm1)
  shift = Mul (sf, half)
  lo = Neg (shift)
  fm1 = Sub (full, one)
  hi = Sub (fm1, shift)
  r = Div (x, scale)
  rr = Round (r)
  y = Clip (rr, lo, hi)
""",
    quantize_input_np,
)


# ---------------------------------------------------------------- BitPlanes
BIT_PLANES = OpDef(
    "BitPlanes", ("q",), ("bits", "signed"),
    """
  b = Constant <value_int: int = @bits> ()
  bf = Cast <to = 1> (b)
  zero = Constant <value_float = 0.0> ()
  one = Constant <value_float = 1.0> ()
  two = Constant <value_float = 2.0> ()
  full = Pow (two, bf)
  neg = Less (q, zero)
  wrapped = Add (q, full)
  u = Where (neg, wrapped, q)
  idx = Range (zero, bf, one)
  pw = Pow (two, idx)
  axes1 = Constant <value_ints = [1]> ()
  pwc = Unsqueeze (pw, axes1)
  flat_shape = Constant <value_ints = [1, -1]> ()
  uf = Reshape (u, flat_shape)
  f = Div (uf, pwc)
  fl = Floor (f)
  f2 = Div (fl, two)
  fl2 = Floor (f2)
  tw = Mul (fl2, two)
  bitsv = Sub (fl, tw)
  minus1 = Constant <value_ints = [-1]> ()
  rest = Shape <start = 1> (q)
  out_shape = Concat <axis = 0> (minus1, rest)
  y = Reshape (bitsv, out_shape)
""",
    bit_planes_np,
)


# ---------------------------------------------------------------- AdcQuantize
ADC_QUANTIZE = OpDef(
    "AdcQuantize", ("s", "scale", "zero_point"), ("bits",),
    """
  b = Constant <value_int: int = @bits> ()
  bf = Cast <to = 1> (b)
  zero = Constant <value_float = 0.0> ()
  one = Constant <value_float = 1.0> ()
  two = Constant <value_float = 2.0> ()
  full = Pow (two, bf)
  top = Sub (full, one)
  r = Div (s, scale)
  rr = Round (r)
  c = Add (rr, zero_point)
  code = Clip (c, zero, top)
  d = Sub (code, zero_point)
  y = Mul (d, scale)
""",
    adc_quantize_np,
)

# ---------------------------------------------------------------- Recombine
RECOMBINE = OpDef(
    "Recombine", ("a", "coef"), ("planes", "groups", "tiles", "slices"),
    """
  ax0 = Constant <value_ints = [0]> ()
  p0 = Constant <value_int: int = @planes> ()
  g0 = Constant <value_int: int = @groups> ()
  t0 = Constant <value_int: int = @tiles> ()
  s0 = Constant <value_int: int = @slices> ()
  p = Unsqueeze (p0, ax0)
  g = Unsqueeze (g0, ax0)
  t = Unsqueeze (t0, ax0)
  sl = Unsqueeze (s0, ax0)
  one = Constant <value_ints = [1]> ()
  minus1 = Constant <value_ints = [-1]> ()
  cols = Shape <start = 1, end = 2> (a)
  spatial = Shape <start = 2> (a)
  gt = Mul (g, t)
  gts = Mul (gt, sl)
  coutg = Div (cols, gts)
  split = Concat <axis = 0> (p, minus1, g, t, sl, coutg, spatial)
  ad = Cast <to = 11> (a)
  r = Reshape (ad, split)
  cshape = Concat <axis = 0> (p, one, one, one, sl, one, one, one)
  cd = Cast <to = 11> (coef)
  c = Reshape (cd, cshape)
  m = Mul (r, c)
  axes = Constant <value_ints = [0, 3, 4]> ()
  acc = ReduceSum <keepdims = 0> (m, axes)
  gc = Mul (g, coutg)
  merged = Concat <axis = 0> (minus1, gc, spatial)
  accf = Cast <to = 1> (acc)
  y = Reshape (accf, merged)
""",
    recombine_np,
)


# ---------------------------------------------------------------- AdcQuantizeNonIdeal
# Counter-based noise: a conversion's thermal noise is a pure function of
# (seed, the row's partial sums, the position in the row), so it never depends
# on the batch size or on the other images of a batch, and the same seed gives
# the same outputs on every run.  All integer steps are uint32 arithmetic that
# wraps modulo 2^32 (multiply, add, shift right), so the ONNX function body, the
# native kernel and numpy compute identical integers; the normal deviate is the
# Irwin-Hall sum of four 8-bit uniforms (the four bytes of one hash: mean 0,
# variance 1, tails cut at +-2*sqrt(3)), which needs no transcendental function
# and is exact in float32.




_MIX_BODY = """
  {o}_a = Mul ({i}, mk1)
  {o}_b = BitShift <direction = "RIGHT"> ({o}_a, sh16)
  {o}_c = Add ({o}_a, {o}_b)
  {o}_d = Mul ({o}_c, mk2)
  {o}_e = BitShift <direction = "RIGHT"> ({o}_d, sh13)
  {o}_f = Add ({o}_d, {o}_e)
  {o}_g = Mul ({o}_f, mk3)
  {o}_h = BitShift <direction = "RIGHT"> ({o}_g, sh16)
  {o} = Add ({o}_g, {o}_h)
"""

ADC_QUANTIZE_NONIDEAL = OpDef(
    "AdcQuantizeNonIdeal", ("s", "scale", "zero_point", "gain", "offset", "lut"), ("bits", "noise_sigma", "seed"),
    """
  b = Constant <value_int: int = @bits> ()
  bf = Cast <to = 1> (b)
  zero = Constant <value_float = 0.0> ()
  one = Constant <value_float = 1.0> ()
  two = Constant <value_float = 2.0> ()
  half = Constant <value_float = 0.5> ()
  full = Pow (two, bf)
  top = Sub (full, one)
  topm1 = Sub (top, one)
  r = Div (s, scale)
  gr = Mul (gain, r)
  v = Add (gr, offset)
  w = Add (v, zero_point)
  wc = Clip (w, zero, top)
  fl = Floor (wc)
  k0f = Min (fl, topm1)
  frac = Sub (wc, k0f)
  k0 = Cast <to = 7> (k0f)
  one64 = Constant <value_int = 1> ()
  k1i = Add (k0, one64)
  lo = Gather <axis = 0> (lut, k0)
  hi = Gather <axis = 0> (lut, k1i)
  dl = Sub (hi, lo)
  fd = Mul (frac, dl)
  interp = Add (lo, fd)
  outside = Sub (w, wc)
  f = Add (interp, outside)
  sigma = Constant <value_float: float = @noise_sigma> ()
  seedv = Constant <value_int: int = @seed> ()
  mk1 = Constant <value = uint32 {2654435761}> ()
  mk2 = Constant <value = uint32 {2246822507}> ()
  mk3 = Constant <value = uint32 {3266489909}> ()
  nk1 = Constant <value = uint32 {2146121005}> ()
  nk2 = Constant <value = uint32 {2221713035}> ()
  sh15 = Constant <value = uint32 {15}> ()
  sh16 = Constant <value = uint32 {16}> ()
  sh13 = Constant <value = uint32 {13}> ()
  m8 = Constant <value = uint32 {256}> ()
  sh8 = Constant <value = uint32 {8}> ()
  sh24 = Constant <value = uint32 {24}> ()
  p32 = Constant <value = double {4294967296.0}> ()
  sixteen = Constant <value = double {16.0}> ()
  sqrt3 = Constant <value_float = 1.7320508> ()
  twof = Constant <value_float = 2.0> ()
  den = Constant <value_float = 256.0> ()
  kst = Constant <value_ints = [0]> ()
  srows = Flatten <axis = 1> (s)
  ken = Constant <value_ints = [4096]> ()
  kax = Constant <value_ints = [1]> ()
  shead = Slice (srows, kst, ken, kax)
  sd = Cast <to = 11> (shead)
  s16 = Mul (sd, sixteen)
  sfl = Floor (s16)
  rsum2 = ReduceSum <keepdims = 1> (sfl, kax)
  r4 = Constant <value_ints = [-1, 1, 1, 1]> ()
  rsum = Reshape (rsum2, r4)
  rabs = Abs (rsum)
  rmod = Mod <fmod = 1> (rabs, p32)
  rk64 = Cast <to = 7> (rmod)
  rk = Cast <to = 12> (rk64)
  seedu = Cast <to = 12> (seedv)
""" + _MIX_BODY.format(o="ms", i="seedu") + """
  rks = Add (rk, ms)
""" + _MIX_BODY.format(o="key", i="rks") + """
  zero64 = Constant <value_int = 0> ()
  rowshape = Shape <start = 1> (s)
  rowsize = ReduceProd <keepdims = 0> (rowshape)
  cnt = Range (zero64, rowsize, one64)
  onev = Constant <value_ints = [1]> ()
  cshape = Concat <axis = 0> (onev, rowshape)
  cnt4 = Reshape (cnt, cshape)
  cntu = Cast <to = 12> (cnt4)
""" + _MIX_BODY.format(o="mc", i="cntu") + """
  mck = Add (mc, key)
  h_a = BitShift <direction = "RIGHT"> (mck, sh16)
  h_b = Add (mck, h_a)
  h_c = Mul (h_b, nk1)
  h_d = BitShift <direction = "RIGHT"> (h_c, sh15)
  h_e = Add (h_c, h_d)
  h_f = Mul (h_e, nk2)
  h_g = BitShift <direction = "RIGHT"> (h_f, sh16)
  h = Add (h_f, h_g)
  a1 = Mod (h, m8)
  b2 = BitShift <direction = "RIGHT"> (h, sh8)
  a2 = Mod (b2, m8)
  b3 = BitShift <direction = "RIGHT"> (h, sh16)
  a3 = Mod (b3, m8)
  a4 = BitShift <direction = "RIGHT"> (h, sh24)
  f1 = Cast <to = 1> (a1)
  f2 = Cast <to = 1> (a2)
  f3 = Cast <to = 1> (a3)
  f4 = Cast <to = 1> (a4)
  f12 = Add (f1, f2)
  f123 = Add (f12, f3)
  fsum = Add (f123, f4)
  fs2 = Add (fsum, twof)
  fu = Div (fs2, den)
  z = Sub (fu, twof)
  ss = Mul (sigma, sqrt3)
  n = Mul (ss, z)
  fn = Add (f, n)
  rr = Round (fn)
  code = Clip (rr, zero, top)
  d = Sub (code, zero_point)
  y = Mul (d, scale)
""",
    adc_quantize_nonideal_np,
)

# ---------------------------------------------------------------- fused conversion + recombination
# Recombine(AdcQuantize(s)) in one op: the native kernel reads the partial sums
# once instead of writing and re-reading the converted tensor.
_RECOMBINE_ATTRS = "planes: int = @planes, groups: int = @groups, tiles: int = @tiles, slices: int = @slices"


ADC_RECOMBINE = OpDef(
    "AdcRecombine", ("s", "scale", "zero_point", "coef"), ("bits", "planes", "groups", "tiles", "slices"),
    f"""
  a = {DOMAIN}.AdcQuantize <bits: int = @bits> (s, scale, zero_point)
  y = {DOMAIN}.Recombine <{_RECOMBINE_ATTRS}> (a, coef)
""",
    adc_recombine_np, uses=("AdcQuantize", "Recombine"),
)

ADC_RECOMBINE_NONIDEAL = OpDef(
    "AdcRecombineNonIdeal", ("s", "scale", "zero_point", "gain", "offset", "lut", "coef"),
    ("bits", "noise_sigma", "seed", "planes", "groups", "tiles", "slices"),
    f"""
  a = {DOMAIN}.AdcQuantizeNonIdeal <bits: int = @bits, noise_sigma: float = @noise_sigma, seed: int = @seed> (s, scale, zero_point, gain, offset, lut)
  y = {DOMAIN}.Recombine <{_RECOMBINE_ATTRS}> (a, coef)
""",
    adc_recombine_nonideal_np, uses=("AdcQuantizeNonIdeal", "Recombine"),
)

# ---------------------------------------------------------------- fused array op (runtime only)
# Conv + AdcRecombine in one op.  The compiler never writes it: a native session rewrites each
# layer chunk's array conv and ADC into it (pimc.runtime.fuse), so the native kernel multiplies
# bytes with exact integer sums and converts every column while it is in cache.  Its body is
# the ops it replaces (QuantizeInput, Pad + Gather of the tile channels, Conv, ADC, and the
# chunk sum and output affine after it), so the rewritten model still runs anywhere.
# ``channels`` (int64): the channel of x each conv input channel reads, x's channel count (or
# -1) meaning a zero channel.  ``x_scale``: the layer's input quantization, q = QuantizeInput(x,
# x_scale) with bits ``x_bits`` and ``x_signed`` (the kernel stores q as bytes: 1: in
# [-128, 127], shifted by 128; 0: in [0, 255]); where x is already integer (bit planes, or a
# QuantizeInput the rewrite left alone) x_scale is 1, and q = x for such x.  After the
# recombination r: y = (addend + r) * out_scale + out_bias, three float32 operations in that
# order: ``addend`` the earlier chunks' sum (the Sum of chunks is a left fold) or a scalar 0,
# ``out_scale`` / ``out_bias`` the layer's dequantization Mul and bias Add (per output channel)
# or scalars 1 / 0.  The recombination's output is never -0.0 (its float64 sum starts at +0),
# so with the scalars the three operations return r unchanged.  Then y + residual (the layer's
# residual Add: a tensor of the output's shape, or the scalar -0.0, which adds nothing to any
# value) and, where the attribute ``relu`` is 1, the Relu that followed (onnxruntime's: x < 0 ? 0 : x,
# so -0.0 and NaN stay).
_GATHER = f"""
  xq = {DOMAIN}.QuantizeInput <bits: int = @x_bits, signed: int = @x_signed> (x, x_scale)
  zero_channel = Constant <value_ints = [0, 0, 0, 0, 0, 1, 0, 0]> ()
  xp = Pad (xq, zero_channel)
  xg = Gather <axis = 1> (xp, channels)"""
_EPILOGUE = """
  ya = Add (addend, r)
  ys = Mul (ya, out_scale)
  yb = Add (ys, out_bias)
  yr = Add (yb, residual)
  yz = Relu (yr)
  relu_flag = Constant <value_int: int = @relu> ()
  relu_on = Cast <to = 9> (relu_flag)
  y = Where (relu_on, yz, yr)"""
_EPILOGUE_INPUTS = ("x_scale", "addend", "out_scale", "out_bias", "residual")
_CONV_ATTRS = "strides: ints = @strides, pads: ints = @pads, dilations: ints = @dilations, group: int = @group"


def conv2d_np(x, w, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """ONNX Conv (NCHW, no bias) in float64 on numpy arrays, rounded to float32 once: exact for
    the integer partial sums of the IR (below 2^24), as onnxruntime's float32 Conv is."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    w = np.asarray(w, np.float64)
    M, cg, kh, kw = w.shape
    B, C, H, W = x.shape
    oh = (H - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (W - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((B, M, oh, ow))
    mg = M // group
    for g in range(group):
        xs = x[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilations[0]:i * dilations[0] + strides[0] * (oh - 1) + 1:strides[0],
                           j * dilations[1]:j * dilations[1] + strides[1] * (ow - 1) + 1:strides[1]]
                out[:, g * mg:(g + 1) * mg] += np.einsum("bchw,mc->bmhw", patch, w[g * mg:(g + 1) * mg, :, i, j])
    return out.astype(np.float32)


def gather_channels_np(x, channels):
    """x's channels in the order ``channels`` gives, where index C (x's channel count) or -1
    is an appended zero channel (the IR's Pad + Gather in front of an array conv)."""
    x = np.asarray(x)
    xp = np.concatenate([x, np.zeros_like(x[:, :1])], axis=1)
    return xp[:, np.asarray(channels, np.int64)]


def _epilogue_np(r, addend, out_scale, out_bias, residual, relu):
    f = np.float32
    y = ((np.asarray(addend, f) + r) * np.asarray(out_scale, f) + np.asarray(out_bias, f)).astype(f)
    y = (y + np.asarray(residual, f)).astype(f)
    return np.where(y < 0, f(0), y).astype(f) if relu else y


def _conv_adc_recombine_np(x, channels, w, scale, zero_point, coef, x_scale=1.0, addend=0.0, out_scale=1.0,
                           out_bias=0.0, residual=-0.0, *, bits, planes, groups, tiles, slices, strides=(1, 1),
                           pads=(0, 0, 0, 0), dilations=(1, 1), group=1, x_signed=0, x_bits=8, relu=0):
    x = gather_channels_np(quantize_input_np(x, x_scale, bits=x_bits, signed=x_signed), channels)
    r = adc_recombine_np(conv2d_np(x, w, strides, pads, dilations, group), scale, zero_point, coef, bits=bits,
                         planes=planes, groups=groups, tiles=tiles, slices=slices)
    return _epilogue_np(r, addend, out_scale, out_bias, residual, relu)


def _conv_adc_recombine_nonideal_np(x, channels, w, scale, zero_point, gain, offset, lut, coef, x_scale=1.0, addend=0.0,
                                    out_scale=1.0, out_bias=0.0, residual=-0.0, *, bits, noise_sigma, seed, planes,
                                    groups, tiles, slices, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
                                    x_signed=0, x_bits=8, relu=0):
    x = gather_channels_np(quantize_input_np(x, x_scale, bits=x_bits, signed=x_signed), channels)
    r = adc_recombine_nonideal_np(conv2d_np(x, w, strides, pads, dilations, group), scale, zero_point, gain,
                                  offset, lut, coef, bits=bits, noise_sigma=noise_sigma, seed=seed, planes=planes,
                                  groups=groups, tiles=tiles, slices=slices)
    return _epilogue_np(r, addend, out_scale, out_bias, residual, relu)


CONV_ADC_RECOMBINE = OpDef(
    "ConvAdcRecombine", ("x", "channels", "w", "scale", "zero_point", "coef", *_EPILOGUE_INPUTS),
    ("strides", "pads", "dilations", "group", "x_signed", "x_bits", "bits", "planes", "groups", "tiles", "slices",
     "relu"),
    f"""
{_GATHER}
  s = Conv <{_CONV_ATTRS}> (xg, w)
  r = {DOMAIN}.AdcRecombine <bits: int = @bits, {_RECOMBINE_ATTRS}> (s, scale, zero_point, coef)
{_EPILOGUE}
""",
    _conv_adc_recombine_np, uses=("QuantizeInput", "AdcRecombine"),
)

CONV_ADC_RECOMBINE_NONIDEAL = OpDef(
    "ConvAdcRecombineNonIdeal",
    ("x", "channels", "w", "scale", "zero_point", "gain", "offset", "lut", "coef", *_EPILOGUE_INPUTS),
    ("strides", "pads", "dilations", "group", "x_signed", "x_bits", "bits", "noise_sigma", "seed", "planes", "groups",
     "tiles", "slices", "relu"),
    f"""
{_GATHER}
  s = Conv <{_CONV_ATTRS}> (xg, w)
  r = {DOMAIN}.AdcRecombineNonIdeal <bits: int = @bits, noise_sigma: float = @noise_sigma, seed: int = @seed, {_RECOMBINE_ATTRS}> (s, scale, zero_point, gain, offset, lut, coef)
{_EPILOGUE}
""",
    _conv_adc_recombine_nonideal_np, uses=("QuantizeInput", "AdcRecombineNonIdeal"),
)

OPS: dict[str, OpDef] = {op.name: op for op in (QUANTIZE_INPUT, BIT_PLANES, ADC_QUANTIZE, RECOMBINE,
                                                ADC_QUANTIZE_NONIDEAL, ADC_RECOMBINE, ADC_RECOMBINE_NONIDEAL,
                                                CONV_ADC_RECOMBINE, CONV_ADC_RECOMBINE_NONIDEAL)}


def function_protos(names=None) -> list[onnx.FunctionProto]:
    """Function bodies of the named ops (all when ``names`` is None) and of the ops they call, callees first."""
    order: list[str] = []

    def add(n):
        for u in OPS[n].uses:
            add(u)
        if n not in order:
            order.append(n)
    for n in (names if names is not None else OPS):
        add(n)
    return [OPS[n].function_proto() for n in order]
