"""One definition of the PIM math: every formula gives the same bits on numpy and on torch."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pimc.core import formulas as F

torch = pytest.importorskip("torch", reason="needs torch (pip install '.[torch]') to compare numpy with torch")


def _both(fn, arrays, **kw):
    a = fn(*arrays, **kw)
    t = fn(*[torch.from_numpy(np.ascontiguousarray(v)) for v in arrays], **kw).numpy()
    assert a.dtype == t.dtype and a.shape == t.shape
    # bit for bit: compare the raw bytes (NaN and -0.0 included)
    assert a.tobytes() == t.tobytes()
    return a


@st.composite
def adc_case(draw):
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    rows, cols, hw = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 5))
    bits = draw(st.integers(1, 9))
    spread = draw(st.sampled_from([1.0, 16.0, 300.0]))
    s = (rng.standard_normal((rows, cols, hw, hw)) * spread).astype(np.float32)
    if draw(st.booleans()):
        s = np.round(s)                       # integral partial sums (bit-serial, 1-bit cells)
    scale = np.maximum(1.0, rng.random((1, cols, 1, 1)) * spread / 4).astype(np.float32)
    zp = np.round(rng.random((1, cols, 1, 1)) * (2 ** bits - 1)).astype(np.float32)
    gain = (1 + 0.03 * rng.standard_normal((1, cols, 1, 1))).astype(np.float32)
    off = (2 * rng.standard_normal((1, cols, 1, 1))).astype(np.float32)
    L = 2 ** bits
    inl = draw(st.sampled_from([0.0, 0.8]))
    lut = (np.arange(L) + inl * np.sin(np.pi * np.arange(L) / max(L - 1, 1))).astype(np.float32)
    return dict(s=s, scale=scale, zp=zp, gain=gain, off=off, lut=lut, bits=bits,
                sigma=draw(st.sampled_from([0.0, 0.5, 1.3])), seed=draw(st.integers(0, 2 ** 31 - 1)))


@settings(max_examples=60, deadline=None)
@given(adc_case())
def test_adc_formulas_numpy_equals_torch(c):
    _both(F.adc_quantize, (c["s"], c["scale"], c["zp"]), bits=c["bits"])
    _both(F.adc_quantize_nonideal, (c["s"], c["scale"], c["zp"], c["gain"], c["off"], c["lut"]), bits=c["bits"],
          noise_sigma=c["sigma"], seed=c["seed"])
    _both(F.thermal_noise, (c["s"],), sigma=max(c["sigma"], 0.1), seed=c["seed"])
    _both(F.adc_code, (c["s"], c["scale"], c["zp"]))
    _both(F.adc_code, (c["s"], c["scale"], c["zp"], c["gain"], c["off"], c["lut"]))
    _both(F.row_keys, (c["s"],))
    w = (c["gain"] * (c["s"] / c["scale"]) + c["off"] + c["zp"]).astype(np.float32)
    if c["lut"].shape[0] >= 2:
        _both(F.transfer, (w, c["lut"]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.booleans(), st.integers(0, 2 ** 31 - 1), st.sampled_from([0.003, 0.05, 1.0]))
def test_input_formulas_numpy_equals_torch(bits, signed, seed, scale):
    x = (np.random.default_rng(seed).standard_normal((3, 4, 5)) * 2).astype(np.float32)
    q = _both(F.quantize_input, (x,), scale=scale, bits=bits, signed=int(signed))
    planes = _both(F.bit_planes, (q,), bits=bits, signed=int(signed))
    # the planes recombine to the integers exactly
    w = F.plane_weights(bits, int(signed))
    assert np.array_equal((planes.reshape(bits, *q.shape) * w[:, None, None, None]).sum(0), q)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4),
       st.integers(0, 2 ** 31 - 1))
def test_recombination_numpy_equals_torch(planes, groups, tiles, slices, cout_g, seed):
    rng = np.random.default_rng(seed)
    a = np.round(rng.standard_normal((planes * 2, groups * tiles * slices * cout_g, 3, 2)) * 50).astype(np.float32)
    coef = rng.integers(-8, 9, (planes, slices)).astype(np.float32)
    _both(F.recombine, (a, coef), planes=planes, groups=groups, tiles=tiles, slices=slices)
    # converted values (code - z) * Delta are not integers, and their magnitudes differ widely
    v = (a * rng.uniform(0.3, 1e4, (1, a.shape[1], 1, 1))).astype(np.float32)
    _both(F.recombine, (v, rng.choice([1, -1, 2, 0.5, -8, 16, 3], (planes, slices)).astype(np.float32)), planes=planes,
          groups=groups, tiles=tiles, slices=slices)
    _both(F.adc_recombine, (a, np.full((1, a.shape[1], 1, 1), 2, np.float32), np.full((1, a.shape[1], 1, 1), 7, np.float32),
                            coef), bits=4, planes=planes, groups=groups, tiles=tiles, slices=slices)


def test_hash_matches_32_bit_unsigned_arithmetic():
    """mix32 on int64 masked = the same hash in uint32 arithmetic (an independent spelling)."""
    x = np.random.default_rng(1).integers(0, 2 ** 32, 1000, dtype=np.int64)
    u = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        for m, sh in ((2654435761, 16), (2246822507, 13), (3266489909, 16)):
            u = u * np.uint32(m)
            u = u + (u >> np.uint32(sh))
    assert np.array_equal(F.mix32(x), u.astype(np.int64))
    assert np.array_equal(F.mix32(torch.from_numpy(x)).numpy(), u.astype(np.int64))


@settings(max_examples=40, deadline=None)
@given(adc_case())
def test_the_adc_code_is_what_the_adc_clips(c):
    """Layer statistics count clipping with adc_code: clipped to the ADC's range it is the code
    the ADC ops convert with (ideal, and on a chip without noise)."""
    top = float(2 ** c["bits"] - 1)
    for code, value in (
            (F.adc_code(c["s"], c["scale"], c["zp"]), F.adc_quantize(c["s"], c["scale"], c["zp"], bits=c["bits"])),
            (F.adc_code(c["s"], c["scale"], c["zp"], c["gain"], c["off"], c["lut"]),
             F.adc_quantize_nonideal(c["s"], c["scale"], c["zp"], c["gain"], c["off"], c["lut"], bits=c["bits"],
                                     noise_sigma=0.0, seed=0))):
        assert np.array_equal((np.clip(code, 0, top) - c["zp"]) * c["scale"], value)
