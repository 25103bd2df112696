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

DOMAIN = "ai.pimc"
DOMAIN_VERSION = 1
BODY_OPSET = 17  # opset of the standard ops used inside the function bodies


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attributes: tuple[str, ...]
    body: str  # ONNX textual function body
    numpy: Callable

    def function_proto(self) -> onnx.FunctionProto:
        text = (f'<domain: "{DOMAIN}", opset_import: ["" : {BODY_OPSET}]>\n'
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

OPS: dict[str, OpDef] = {op.name: op for op in (QUANTIZE_INPUT, BIT_PLANES, ADC_QUANTIZE)}


def function_protos(names=None) -> list[onnx.FunctionProto]:
    """Function bodies of the named ops (all ops when ``names`` is None)."""
    return [OPS[n].function_proto() for n in (names if names is not None else OPS)]
