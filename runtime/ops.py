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
def quantize_input_np(x: np.ndarray, scale, *, bits: int, signed: int) -> np.ndarray:
    lo, hi = input_range(bits, signed)
    return np.clip(np.round(np.asarray(x, np.float32) / np.float32(scale)), lo, hi).astype(np.float32)


def input_range(bits: int, signed: int) -> tuple[float, float]:
    """Integer range of a quantized input: [0, 2^b-1] or [-2^(b-1), 2^(b-1)-1]."""
    if signed:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2 ** bits - 1)


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
def bit_planes_np(q: np.ndarray, *, bits: int, signed: int) -> np.ndarray:
    q = np.asarray(q, np.float32)
    u = np.where(q < 0, q + np.float32(2 ** bits), q)
    planes = [np.floor(u / np.float32(2 ** p)) - 2 * np.floor(u / np.float32(2 ** (p + 1))) for p in range(bits)]
    return np.concatenate(planes, axis=0).astype(np.float32)


def plane_weights(bits: int, signed: int) -> np.ndarray:
    """Recombination weight of each bit plane: 2^p, the MSB -2^(b-1) when signed."""
    w = np.array([2.0 ** p for p in range(bits)], np.float32)
    if signed:
        w[-1] = -w[-1]
    return w


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
def adc_quantize_np(s: np.ndarray, scale, zero_point, *, bits: int) -> np.ndarray:
    s = np.asarray(s, np.float32)
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zero_point, np.float32)
    code = np.clip(np.round(s / scale) + zp, np.float32(0), np.float32(2 ** bits - 1))
    return ((code - zp) * scale).astype(np.float32)


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
def recombine_np(a: np.ndarray, coef: np.ndarray, *, planes: int, groups: int, tiles: int, slices: int) -> np.ndarray:
    a = np.asarray(a, np.float32)
    rows, cols = a.shape[0], a.shape[1]
    cout_g = cols // (groups * tiles * slices)
    r = a.astype(np.float64).reshape(planes, rows // planes, groups, tiles, slices, cout_g, *a.shape[2:])
    c = np.asarray(coef, np.float32).astype(np.float64).reshape(planes, 1, 1, 1, slices, 1, *([1] * (a.ndim - 2)))
    acc = (r * c).sum(axis=(0, 3, 4))  # float64: exact for these sums, so the order does not matter
    return acc.reshape(rows // planes, groups * cout_g, *a.shape[2:]).astype(np.float32)


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
U32 = np.uint32
MIX = (2654435761, 2246822507, 3266489909)
SQRT3 = np.float32(1.7320508)


def mix32(x) -> np.ndarray:
    x = np.asarray(x).astype(U32)
    with np.errstate(over="ignore"):
        x = x * U32(MIX[0])
        x = x + (x >> U32(16))
        x = x * U32(MIX[1])
        x = x + (x >> U32(13))
        x = x * U32(MIX[2])
        x = x + (x >> U32(16))
    return x.astype(U32)


def mix2(x) -> np.ndarray:
    """The cheaper two-multiply mix used per conversion."""
    x = np.asarray(x).astype(U32)
    with np.errstate(over="ignore"):
        x = x + (x >> U32(16))
        x = x * U32(2146121005)
        x = x + (x >> U32(15))
        x = x * U32(2221713035)
        x = x + (x >> U32(16))
    return x.astype(U32)


KEY_VALUES = 4096  # the row key reads the first KEY_VALUES partial sums of a row


def row_keys_np(s: np.ndarray) -> np.ndarray:
    """Per batch row: sum of floor(16 s) over the row's first KEY_VALUES values, in
    float64 (exact, order-free), modulo 2^32."""
    s = np.asarray(s, np.float32)
    f = np.floor(s.reshape(s.shape[0], -1)[:, :KEY_VALUES].astype(np.float64) * 16.0).sum(1)
    return np.mod(np.abs(f), 2.0 ** 32).astype(np.int64).astype(U32)


def thermal_noise_np(s: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rows = s.shape[0]
    n = int(np.prod(s.shape[1:]))
    with np.errstate(over="ignore"):
        key = mix32(row_keys_np(s) + mix32(np.int64(seed)))[:, None]
        h = mix2(mix32(np.arange(n, dtype=np.int64))[None, :] + key)
    f = sum(v.astype(np.float32) for v in (h % U32(256), (h >> U32(8)) % U32(256), (h >> U32(16)) % U32(256),
                                           h >> U32(24)))
    z = (f + np.float32(2)) / np.float32(256) - np.float32(2)
    return ((np.float32(sigma) * SQRT3) * z).astype(np.float32).reshape(rows, *s.shape[1:])


def transfer_np(w: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Piecewise-linear transfer curve over the code domain; identity slope outside."""
    L = lut.shape[0]
    wc = np.clip(w, np.float32(0), np.float32(L - 1))
    k0 = np.minimum(np.floor(wc), np.float32(L - 2)).astype(np.int64)
    frac = (wc - k0.astype(np.float32)).astype(np.float32)
    lo, hi = lut[k0], lut[k0 + 1]
    return (lo + frac * (hi - lo) + (w - wc)).astype(np.float32)


def adc_quantize_nonideal_np(s, scale, zero_point, gain, offset, lut, *, bits: int, noise_sigma: float,
                             seed: int) -> np.ndarray:
    s = np.asarray(s, np.float32)
    scale, zp = np.asarray(scale, np.float32), np.asarray(zero_point, np.float32)
    gain, offset = np.asarray(gain, np.float32), np.asarray(offset, np.float32)
    lut = np.asarray(lut, np.float32)
    w = (gain * (s / scale) + offset + zp).astype(np.float32)
    f = transfer_np(w, lut) if lut.shape[0] >= 2 else w
    if noise_sigma > 0:
        f = f + thermal_noise_np(s, noise_sigma, seed)
    code = np.clip(np.round(f), np.float32(0), np.float32(2 ** bits - 1))
    return ((code - zp) * scale).astype(np.float32)


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


def adc_recombine_np(s, scale, zero_point, coef, *, bits, planes, groups, tiles, slices):
    return recombine_np(adc_quantize_np(s, scale, zero_point, bits=bits), coef, planes=planes, groups=groups,
                        tiles=tiles, slices=slices)


def adc_recombine_nonideal_np(s, scale, zero_point, gain, offset, lut, coef, *, bits, noise_sigma, seed, planes,
                              groups, tiles, slices):
    a = adc_quantize_nonideal_np(s, scale, zero_point, gain, offset, lut, bits=bits, noise_sigma=noise_sigma, seed=seed)
    return recombine_np(a, coef, planes=planes, groups=groups, tiles=tiles, slices=slices)


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

OPS: dict[str, OpDef] = {op.name: op for op in (QUANTIZE_INPUT, BIT_PLANES, ADC_QUANTIZE, RECOMBINE,
                                                ADC_QUANTIZE_NONIDEAL, ADC_RECOMBINE, ADC_RECOMBINE_NONIDEAL)}


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
