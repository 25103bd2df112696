// Native CPU kernels of the pimc PIM IR (domain ai.pimc, version 1).
//
// Each kernel computes exactly the formula of its ONNX function body in
// runtime/ops.py (same float32 operations in the same order, round half to
// even via std::nearbyint, no FMA contraction), so the ideal path is bit
// identical to the function bodies and to numpy.  Built by pimc.runtime.native
// against onnxruntime's C/C++ headers (API version 21 or newer); it needs no
// onnxruntime library at link time.  Threads come from onnxruntime's own pool
// (KernelContext::ParallelFor): no OpenMP.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// The noise generator of runtime/ops.py: uint32 arithmetic wrapping modulo 2^32.
inline uint32_t mix32(uint32_t x) {
  x *= 2654435761u;
  x += x >> 16;
  x *= 2246822507u;
  x += x >> 13;
  x *= 3266489909u;
  x += x >> 16;
  return x;
}

// A cheaper two-multiply mix for the per-conversion noise.
inline uint32_t mix2(uint32_t x) {
  x += x >> 16;
  x *= 2146121005u;
  x += x >> 15;
  x *= 2221713035u;
  x += x >> 16;
  return x;
}

struct Shape4 {
  int64_t rows = 1, cols = 1, inner = 1, total = 1;
};

Shape4 shape_of(const std::vector<int64_t>& s) {
  Shape4 r;
  r.total = 1;
  for (auto d : s) r.total *= d;
  r.rows = s.empty() ? 1 : s[0];
  r.cols = s.size() > 1 ? s[1] : 1;
  r.inner = 1;
  for (size_t i = 2; i < s.size(); ++i) r.inner *= s[i];
  return r;
}

// A per-column parameter: a scalar, or one value per column (axis 1).
struct ColParam {
  const float* p;
  int64_t n;
  float at(int64_t col) const { return n == 1 ? p[0] : p[col]; }
};

ColParam col_param(Ort::KernelContext& ctx, size_t i, int64_t cols, const char* op, const char* what) {
  auto v = ctx.GetInput(i);
  int64_t n = v.GetTensorTypeAndShapeInfo().GetElementCount();
  if (n != 1 && n != cols)
    ORT_CXX_API_THROW(std::string(op) + ": input '" + what + "' must hold 1 or one value per column",
                      ORT_INVALID_ARGUMENT);
  return {v.GetTensorData<float>(), n};
}

template <typename F>
void parallel(Ort::KernelContext& ctx, int64_t n, F&& f) {
  struct Ctx { F* f; };
  Ctx c{&f};
  if (n <= 1) {
    if (n == 1) f(0);
    return;
  }
  ctx.ParallelFor([](void* u, size_t i) { (*static_cast<Ctx*>(u)->f)(static_cast<int64_t>(i)); },
                  static_cast<size_t>(n), 0, &c);
}

// ------------------------------------------------------------------ conversion loops (shared)
// Where converted values go: Store writes them (AdcQuantize*), AddTerm adds
// value * k into a float64 row (the fused recombination: acc += double(v) * k, as
// the Recombine body), so the fused kernels never write a scratch buffer.
struct Store {
  float* __restrict out;
  void put(int64_t i, float v) const { out[i] = v; }
#ifdef __AVX2__
  void put8(int64_t i, __m256 v) const { _mm256_storeu_ps(out + i, v); }
#endif
#ifdef __AVX512F__
  void put16(int64_t i, __m512 v) const { _mm512_storeu_ps(out + i, v); }
#endif
};

// dst[i] = T((src ? src[i] : +0.0) + double(v) * k): a recombination term added into a float64
// running sum (src == dst: acc += double(v) * k, as the Recombine body), or the last term of a
// sum rounded once to float32 (T = float).  src may be dst.
template <typename T>
struct AddTerm {
  const double* src;
  T* dst;
  double k;
  void put(int64_t i, float v) const {
    dst[i] = static_cast<T>((src == nullptr ? 0.0 : src[i]) + static_cast<double>(v) * k);
  }
#ifdef __AVX2__
  void put8(int64_t i, __m256 v) const {
    const __m256d kk = _mm256_set1_pd(k), zd = _mm256_setzero_pd();
    const __m256d lo = _mm256_add_pd(src == nullptr ? zd : _mm256_loadu_pd(src + i),
                                     _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), kk));
    const __m256d hi = _mm256_add_pd(src == nullptr ? zd : _mm256_loadu_pd(src + i + 4),
                                     _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), kk));
    if constexpr (std::is_same_v<T, double>) {
      _mm256_storeu_pd(dst + i, lo);
      _mm256_storeu_pd(dst + i + 4, hi);
    } else {
      _mm_storeu_ps(dst + i, _mm256_cvtpd_ps(lo));
      _mm_storeu_ps(dst + i + 4, _mm256_cvtpd_ps(hi));
    }
  }
#endif
#ifdef __AVX512F__
  void put16(int64_t i, __m512 v) const { put16m(i, v, 0xFFFF); }
  // lanes of m only (the others neither read nor written)
  void put16m(int64_t i, __m512 v, __mmask16 m) const {
    const __mmask8 ml = static_cast<__mmask8>(m), mh = static_cast<__mmask8>(m >> 8);
    const __m512d kk = _mm512_set1_pd(k), zd = _mm512_setzero_pd();
    const __m512d lo = _mm512_add_pd(src == nullptr ? zd : _mm512_maskz_loadu_pd(ml, src + i),
                                     _mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), kk));
    const __m512d hi = _mm512_add_pd(
        src == nullptr ? zd : _mm512_maskz_loadu_pd(mh, src + i + 8),
        _mm512_mul_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))), kk));
    if constexpr (std::is_same_v<T, double>) {
      _mm512_mask_storeu_pd(dst + i, ml, lo);
      _mm512_mask_storeu_pd(dst + i + 8, mh, hi);
    } else {
      _mm256_mask_storeu_ps(dst + i, ml, _mm512_cvtpd_ps(lo));
      _mm256_mask_storeu_ps(dst + i + 8, mh, _mm512_cvtpd_ps(hi));
    }
  }
#endif
};

// Whether x / d is x * (1 / d) for every float x: d = 2^e with |e| <= 126 (1 / d = 2^-e exactly;
// both are the same real number x 2^-e rounded once, subnormal, infinite and NaN results included).
inline bool power_of_two(float d) {
  uint32_t b;
  std::memcpy(&b, &d, 4);
  const int32_t e = static_cast<int32_t>((b >> 23) & 0xFFu) - 127;   // sign 0, fraction 0
  return (b & 0x807FFFFFu) == 0u && e >= -126 && e <= 126;
}

// nearbyint(s / d) for integer-valued float s (|s| < 2^24, never -0.0), without the division
// where that is the same value: s / 1 = s (already an integer); for d = 2^e, s * 2^-e
// (power_of_two); other steps divide.
struct RoundDiv {
  enum Mode { kOne, kPow2, kDivide };
  float d, y;
  Mode mode;
  explicit RoundDiv(float d_) : d(d_), y(1.0f / d_), mode(kDivide) {
    if (d == 1.0f) mode = kOne;
    else if (power_of_two(d)) mode = kPow2;
  }
  float operator()(float s) const { return std::nearbyint(s / d); }
#ifdef __AVX512F__
  __m512 r16(__m512 s) const {
    constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    if (mode == kOne) return s;
    if (mode == kPow2) return _mm512_roundscale_ps(_mm512_mul_ps(s, _mm512_set1_ps(y)), kNear);
    return _mm512_roundscale_ps(_mm512_div_ps(s, _mm512_set1_ps(d)), kNear);
  }
#endif
};

template <typename Sink>
inline void adc_ideal(const float* __restrict in, const Sink& sink, int64_t n, float d, float z, float top) {
  for (int64_t i = 0; i < n; ++i) {
    float code = std::min(std::max(std::nearbyint(in[i] / d) + z, 0.0f), top);
    sink.put(i, (code - z) * d);
  }
}

struct Column {
  float d, z, g, o, top, ss;
  uint32_t key;
  // the curve's segments as two tables, lo[k] = lut[k] and dl[k] = lut[k+1] - lut[k] (64 entries,
  // padded): the AVX-512 loop looks them up with permutes; null where the ADC has more than 64 levels
  const float* lo = nullptr;
  const float* dl = nullptr;
};

// One column's non-ideal conversions, one instantiation per (linear curve?, noise?).
// Its float operations and their order are the function body's (the byte sum of
// the noise is taken in integers: it is at most 1020, exact in float either way),
// so results are bit identical to it.  The AVX2 loops do eight values at a time;
// the scalar loop finishes the tail, and is the whole loop without AVX2.
//
// With a transfer curve, each value reads its segment (start, slope) from ``pairs``
// = {lut[k], lut[k+1] - lut[k]} as one 64-bit load (eight scalar loads beat AVX2
// gathers on the CPUs measured).  One loop doing everything is bound by the length
// of its dependency chain (load, divide, clamp, segment index, loads, interpolate,
// noise, round, accumulate: the reorder buffer holds only a few iterations, too few
// to hide the loads of s), so the values go in blocks of kBlock through two loops:
// the first computes the curve's input (segment index, fraction, the residue
// outside the range; or the value itself without a curve) and the noise into small
// stack buffers, the second reads them back, looks up and finishes.  On one
// ResNet-20 AdcRecombine node (one core, Zen 3) that took a conversion from 1.02
// to 0.93 ns with noise and from 1.79 to 1.34 ns with a curve too (ideal: 0.59 ns);
// scaling the noise in one multiply (Lanes::noise) took another 4 % and 6-16 %.  With AVX-512 the
// loops without a curve, and with a curve of at most 64 levels (its segments by permutes from two
// 64-entry tables in registers), do sixteen values at a time in one pass: on ResNet-20 W1 (6-bit ADC,
// INL curve and noise, 2 cores, Zen 4) 6 % more images/s than the AVX2 blocks with scalar loads.

// Whether ss / 256 is exact (a normal float): then the noise ss * ((fs + 2) / 256 - 2) is scaled in
// one step, (ss / 256) * (fs - 510) (Lanes, Lanes16)
inline bool noise_folds(float ss) {
  const float s256 = ss / 256.0f;
  return std::isnormal(s256) && s256 * 256.0f == ss;
}

template <bool Noisy>
inline float add_noise(float f, uint32_t counter, const Column& k) {
  if (!Noisy) return f;
  uint32_t h = mix2(counter + k.key);
  float fs = static_cast<float>(static_cast<int32_t>(h & 0xFFu)) + static_cast<float>(static_cast<int32_t>((h >> 8) & 0xFFu));
  fs = fs + static_cast<float>(static_cast<int32_t>((h >> 16) & 0xFFu));
  fs = fs + static_cast<float>(static_cast<int32_t>(h >> 24));
  float zn = (fs + 2.0f) / 256.0f - 2.0f;
  return f + k.ss * zn;
}

constexpr int64_t kBlock = 128;

#ifdef __AVX2__
// A column's constants broadcast to eight lanes, and the steps of a conversion.
struct Lanes {
  __m256 d, y, g, o, z, zero, top, two, c256, ss, ss256;
  __m256i last, izero, key, m1, m2, ones8, ones16, c510, m510;
  bool folded;  // ss / 256 is exact (a normal float), so the noise can be scaled in one step
  bool recip;   // power_of_two(d): s / d is s * y

  explicit Lanes(const Column& k)
      : d(_mm256_set1_ps(k.d)), y(_mm256_set1_ps(1.0f / k.d)), g(_mm256_set1_ps(k.g)), o(_mm256_set1_ps(k.o)), z(_mm256_set1_ps(k.z)),
        zero(_mm256_setzero_ps()), top(_mm256_set1_ps(k.top)), two(_mm256_set1_ps(2.0f)), c256(_mm256_set1_ps(256.0f)),
        ss(_mm256_set1_ps(k.ss)), last(_mm256_set1_epi32(static_cast<int32_t>(k.top) - 1)), izero(_mm256_setzero_si256()),
        key(_mm256_set1_epi32(static_cast<int32_t>(k.key))), m1(_mm256_set1_epi32(static_cast<int32_t>(2146121005u))),
        m2(_mm256_set1_epi32(static_cast<int32_t>(2221713035u))), ones8(_mm256_set1_epi8(1)), ones16(_mm256_set1_epi16(1)),
        c510(_mm256_set1_epi32(510)), m510(_mm256_set1_epi32(-510)), folded(noise_folds(k.ss)),
        recip(power_of_two(k.d)) {
    ss256 = _mm256_set1_ps(k.ss / 256.0f);
  }

  // w = (g * (s / d) + o) + z, the gained value in LSB units before the curve
  __m256 gained(const float* in) const {
    const __m256 x = _mm256_loadu_ps(in);
    return _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(g, recip ? _mm256_mul_ps(x, y) : _mm256_div_ps(x, d)), o), z);
  }
  __m256 clamp(__m256 w) const { return _mm256_min_ps(_mm256_max_ps(zero, w), top); }
  // ss * zn of mix2(counter + key): the four bytes' sum (<= 1020) is exact in float,
  // so an integer sum gives the same value
  __m256 noise(const uint32_t* mc) const {
    __m256i h = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mc)), key);
    h = _mm256_add_epi32(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, m1);
    h = _mm256_add_epi32(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, m2);
    h = _mm256_add_epi32(h, _mm256_srli_epi32(h, 16));
    // ss * ((fs + 2) / 256 - 2) == (ss / 256) * (fs - 510) where folded: both are ss (fs - 510) / 256
    // rounded once.  With VNNI the byte sum (and the - 510) is one vpdpbusd.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    if (folded) return _mm256_mul_ps(ss256, _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(m510, h, ones8)));
    const __m256i fs = _mm256_dpbusd_epi32(izero, h, ones8);
#else
    const __m256i fs = _mm256_madd_epi16(_mm256_maddubs_epi16(h, ones8), ones16);
    if (folded) return _mm256_mul_ps(ss256, _mm256_cvtepi32_ps(_mm256_sub_epi32(fs, c510)));
#endif
    return _mm256_mul_ps(ss, _mm256_sub_ps(_mm256_div_ps(_mm256_add_ps(_mm256_cvtepi32_ps(fs), two), c256), two));
  }
  // (clip(round(f), 0, top) - z) * d
  __m256 output(__m256 f) const {
    __m256 code = _mm256_min_ps(_mm256_max_ps(zero, _mm256_round_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), top);
    return _mm256_mul_ps(_mm256_sub_ps(code, z), d);
  }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Lanes' constants and its noise and output steps in sixteen lanes (the AVX-512 loops of
// convert and convert_tabulated): the same operations and operand orders.
struct Lanes16 {
  __m512 d, y, z, zero, top, two, c256, ss, ss256;
  __m512i key, m1, m2, ones8, ones16, c510, m510, izero;
  bool folded, recip;

  explicit Lanes16(const Column& k)
      : d(_mm512_set1_ps(k.d)), y(_mm512_set1_ps(1.0f / k.d)), z(_mm512_set1_ps(k.z)), zero(_mm512_setzero_ps()), top(_mm512_set1_ps(k.top)),
        two(_mm512_set1_ps(2.0f)), c256(_mm512_set1_ps(256.0f)), ss(_mm512_set1_ps(k.ss)),
        ss256(_mm512_set1_ps(k.ss / 256.0f)), key(_mm512_set1_epi32(static_cast<int32_t>(k.key))),
        m1(_mm512_set1_epi32(static_cast<int32_t>(2146121005u))), m2(_mm512_set1_epi32(static_cast<int32_t>(2221713035u))),
        ones8(_mm512_set1_epi8(1)), ones16(_mm512_set1_epi16(1)), c510(_mm512_set1_epi32(510)),
        m510(_mm512_set1_epi32(-510)), izero(_mm512_setzero_si512()), folded(noise_folds(k.ss)),
        recip(power_of_two(k.d)) {}

  // x / d (a multiplication where power_of_two(d): the same value), as Lanes::gained
  __m512 over_d(__m512 x) const { return recip ? _mm512_mul_ps(x, y) : _mm512_div_ps(x, d); }

  // ss * zn of mix2(counter + key), as Lanes::noise
  __m512 noise(const uint32_t* mc) const {
    __m512i h = _mm512_add_epi32(_mm512_loadu_si512(mc), key);
    h = _mm512_add_epi32(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, m1);
    h = _mm512_add_epi32(h, _mm512_srli_epi32(h, 15));
    h = _mm512_mullo_epi32(h, m2);
    h = _mm512_add_epi32(h, _mm512_srli_epi32(h, 16));
    // the four bytes' sum fs, or fs - 510 straight away where the noise is scaled in one step
#if defined(__AVX512VNNI__)
    const __m512i fs = _mm512_dpbusd_epi32(folded ? m510 : izero, h, ones8);   // one instruction
#else
    __m512i fs = _mm512_madd_epi16(_mm512_maddubs_epi16(h, ones8), ones16);
    if (folded) fs = _mm512_sub_epi32(fs, c510);
#endif
    return folded ? _mm512_mul_ps(ss256, _mm512_cvtepi32_ps(fs))
                  : _mm512_mul_ps(ss, _mm512_sub_ps(_mm512_div_ps(_mm512_add_ps(_mm512_cvtepi32_ps(fs), two), c256), two));
  }
  // (clip(round(f), 0, top) - z) * d
  __m512 output(__m512 f) const {
    const __m512 code =
        _mm512_min_ps(_mm512_max_ps(zero, _mm512_roundscale_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), top);
    return _mm512_mul_ps(_mm512_sub_ps(code, z), d);
  }
};
#endif

// The curve's output before noise for one value: the function body's steps.
template <bool Identity>
inline float curve_in(float x, const Column& k, const float* pairs) {
  float rr = x / k.d;
  float gr = k.g * rr;
  float v = gr + k.o;
  float w = v + k.z;
  float wc = std::min(std::max(w, 0.0f), k.top);
  if (Identity) return wc + (w - wc);
  int32_t k0 = std::max(std::min(static_cast<int32_t>(wc), static_cast<int32_t>(k.top) - 1), 0);
  float fr = wc - static_cast<float>(k0);
  return (pairs[2 * k0] + fr * pairs[2 * k0 + 1]) + (w - wc);
}

// The rest of a conversion for one value (Lanes::output after the noise, in scalar):
// (clip(round(f + noise), 0, top) - z) * d
template <bool Noisy>
inline float finish(float f, uint32_t counter, const Column& k) {
  float code = std::min(std::max(std::nearbyint(add_noise<Noisy>(f, counter, k)), 0.0f), k.top);
  return (code - k.z) * k.d;
}

template <bool Identity, bool Noisy, typename Sink>
void convert(const float* __restrict in, const Sink& sink, const uint32_t* __restrict mc, int64_t n,
             const Column& k, const float* __restrict pairs) {
  const Sink out = sink;  // a local copy: the compiler need not reload its fields after each store
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // Without a curve, or with a curve of at most 64 levels, sixteen values at a time in one loop:
  // Lanes' steps (curve_in's and finish's) in 16 lanes, the same operations and operand orders.
  // A curve's segment start and slope come from two 64-entry tables by permutes (registers, no
  // loads per value).
  if (Identity || k.lo != nullptr) {
    const Lanes16 v(k);
    const __m512 g = _mm512_set1_ps(k.g), o = _mm512_set1_ps(k.o), z = v.z, zero = v.zero, top = v.top;
    const __m512i last = _mm512_set1_epi32(static_cast<int32_t>(k.top) - 1), izero = v.izero,
                  bit5 = _mm512_set1_epi32(32);
    __m512 lo0 = zero, lo1 = zero, lo2 = zero, lo3 = zero, dl0 = zero, dl1 = zero, dl2 = zero, dl3 = zero;
    if constexpr (!Identity) {
      lo0 = _mm512_loadu_ps(k.lo), lo1 = _mm512_loadu_ps(k.lo + 16), lo2 = _mm512_loadu_ps(k.lo + 32);
      lo3 = _mm512_loadu_ps(k.lo + 48), dl0 = _mm512_loadu_ps(k.dl), dl1 = _mm512_loadu_ps(k.dl + 16);
      dl2 = _mm512_loadu_ps(k.dl + 32), dl3 = _mm512_loadu_ps(k.dl + 48);
    }
    for (; i + 16 <= n; i += 16) {
      const __m512 w = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(g, v.over_d(_mm512_loadu_ps(in + i))), o), z);
      const __m512 wc = _mm512_min_ps(_mm512_max_ps(zero, w), top);
      __m512 f;
      if constexpr (Identity) {
        f = _mm512_add_ps(wc, _mm512_sub_ps(w, wc));
      } else {
        const __m512i k0 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvttps_epi32(wc), last), izero);
        const __mmask16 hi = _mm512_test_epi32_mask(k0, bit5);
        const __m512 lo = _mm512_mask_blend_ps(hi, _mm512_permutex2var_ps(lo0, k0, lo1), _mm512_permutex2var_ps(lo2, k0, lo3));
        const __m512 dl = _mm512_mask_blend_ps(hi, _mm512_permutex2var_ps(dl0, k0, dl1), _mm512_permutex2var_ps(dl2, k0, dl3));
        f = _mm512_add_ps(_mm512_add_ps(lo, _mm512_mul_ps(_mm512_sub_ps(wc, _mm512_cvtepi32_ps(k0)), dl)),
                          _mm512_sub_ps(w, wc));
      }
      if (Noisy) f = _mm512_add_ps(f, v.noise(mc + i));
      out.put16(i, v.output(f));
    }
  }
#endif
#ifdef __AVX2__
  const Lanes v(k);
  alignas(32) int32_t seg[kBlock];
  alignas(32) float frac[kBlock], resid[kBlock], nz[kBlock];  // Identity: frac holds the curve's output
  const double* pd = reinterpret_cast<const double*>(pairs);
  while (i + 8 <= n) {
    const int64_t m = std::min(kBlock, (n - i) & ~int64_t{7});
    for (int64_t j = 0; j < m; j += 8) {
      __m256 w = v.gained(in + i + j), wc = v.clamp(w);
      if constexpr (Identity) {
        _mm256_store_ps(frac + j, _mm256_add_ps(wc, _mm256_sub_ps(w, wc)));
      } else {
        __m256i k0 = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvttps_epi32(wc), v.last), v.izero);
        _mm256_store_si256(reinterpret_cast<__m256i*>(seg + j), k0);
        _mm256_store_ps(frac + j, _mm256_sub_ps(wc, _mm256_cvtepi32_ps(k0)));
        _mm256_store_ps(resid + j, _mm256_sub_ps(w, wc));
      }
      if (Noisy) _mm256_store_ps(nz + j, v.noise(mc + i + j));
    }
    for (int64_t j = 0; j < m; j += 8) {
      __m256 f;
      if constexpr (Identity) {
        f = _mm256_load_ps(frac + j);
      } else {
        const int32_t* q = seg + j;
        __m256 g0 = _mm256_castpd_ps(_mm256_set_pd(pd[q[5]], pd[q[4]], pd[q[1]], pd[q[0]]));
        __m256 g1 = _mm256_castpd_ps(_mm256_set_pd(pd[q[7]], pd[q[6]], pd[q[3]], pd[q[2]]));
        __m256 lo = _mm256_shuffle_ps(g0, g1, _MM_SHUFFLE(2, 0, 2, 0)), dl = _mm256_shuffle_ps(g0, g1, _MM_SHUFFLE(3, 1, 3, 1));
        f = _mm256_add_ps(_mm256_add_ps(lo, _mm256_mul_ps(_mm256_load_ps(frac + j), dl)), _mm256_load_ps(resid + j));
      }
      if (Noisy) f = _mm256_add_ps(f, _mm256_load_ps(nz + j));
      out.put8(i + j, v.output(f));
    }
    i += m;
  }
#endif
  for (; i < n; ++i) out.put(i, finish<Noisy>(curve_in<Identity>(in[i], k, pairs), Noisy ? mc[i] : 0u, k));
}

// Curve conversions of integral partial sums.  With 1-bit input planes and 1-bit
// cells, s is a small integer (ResNet-20 bit-serial: 59 % are 0, and 92-100 % of
// the groups of eight of a layer are all in [0, 15]), so the curve's output before noise,
// f(s) = curve(g * (s / d) + o + z), is tabulated per column for s = 0 .. ntab-1
// by the scalar steps above (curve_in: the same float operations, so the same
// values).  A group of eight integral values in [0, 15] (tested on the bit
// patterns: -0.0 and NaN fail) reads f from two registers with two permutes; a
// group of integral values below ntab reads the table; any other group takes the
// curve's steps value by value.  The noise is computed for a block first, as in
// convert().  On ResNet-20 layers (one core, real partial sums) the curve added
// 0.4-0.6 ns per conversion to the noisy conversion's 0.8-1.0 ns; tabulated, 0.1-0.3.  With AVX-512, sixteen
// values at a time (one permute from one register) with the noise in the same pass: ResNet-20
// bit-serial+differential W4A4 1-bit cells with noise and INL 24 % more images/s (1.41x the
// ideal time against 1.79x; 2 cores, Xeon, both builds in one process).
inline bool tabulated(float x, int32_t ntab) {
  return x >= 0.0f && x < static_cast<float>(ntab) && !std::signbit(x) && static_cast<float>(static_cast<int32_t>(x)) == x;
}

template <bool Noisy, typename Sink>
void convert_tabulated(const float* __restrict in, const Sink& sink, const uint32_t* __restrict mc, int64_t n,
                       const Column& k, const float* __restrict pairs, const float* __restrict tab, int32_t ntab) {
  const Sink out = sink;
  auto f_at = [&](float x) { return tabulated(x, ntab) ? tab[static_cast<int32_t>(x)] : curve_in<false>(x, k, pairs); };
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // sixteen values at a time: f from one register by one permute (all integral in [0, 15]), a
  // gather from the table (all integral below ntab), or the scalar steps; the noise in the same pass
  {
    const Lanes16 v(k);
    const __m512 t = _mm512_loadu_ps(tab);
    const __m512i c15 = _mm512_set1_epi32(15), last = _mm512_set1_epi32(ntab - 1);
    for (; i + 16 <= n; i += 16) {
      const __m512 x = _mm512_loadu_ps(in + i);
      const __m512i q = _mm512_cvttps_epi32(x);
      const __mmask16 integral = _mm512_cmpeq_epi32_mask(_mm512_castps_si512(_mm512_cvtepi32_ps(q)), _mm512_castps_si512(x));
      __m512 f;
      if (__builtin_expect(integral == 0xFFFF && _mm512_cmple_epu32_mask(q, c15) == 0xFFFF, 1)) {
        f = _mm512_permutexvar_ps(q, t);
      } else if (integral == 0xFFFF && _mm512_cmple_epu32_mask(q, last) == 0xFFFF) {
        f = _mm512_i32gather_ps(q, tab, 4);
      } else {
        alignas(64) float fb[16];
        for (int u = 0; u < 16; ++u) fb[u] = f_at(in[i + u]);
        f = _mm512_load_ps(fb);
      }
      if (Noisy) f = _mm512_add_ps(f, v.noise(mc + i));
      out.put16(i, v.output(f));
    }
  }
#endif
#ifdef __AVX2__
  const Lanes v(k);
  const __m256 t0 = _mm256_loadu_ps(tab), t1 = _mm256_loadu_ps(tab + 8);
  const __m256i c15 = _mm256_set1_epi32(15), c7 = _mm256_set1_epi32(7), last = _mm256_set1_epi32(ntab - 1);
  alignas(32) float nz[kBlock];
  while (i + 8 <= n) {
    const int64_t m = std::min(kBlock, (n - i) & ~int64_t{7});
    if (Noisy)
      for (int64_t j = 0; j < m; j += 8) _mm256_store_ps(nz + j, v.noise(mc + i + j));
    for (int64_t j = 0; j < m; j += 8) {
      const __m256 x = _mm256_loadu_ps(in + i + j);
      const __m256i q = _mm256_cvttps_epi32(x);
      const __m256i integral = _mm256_cmpeq_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(q)), _mm256_castps_si256(x));
      auto all_below = [&](__m256i top) {  // every q integral and (unsigned) <= top
        const __m256i ok = _mm256_and_si256(integral, _mm256_cmpeq_epi32(_mm256_min_epu32(q, top), q));
        return _mm256_movemask_ps(_mm256_castsi256_ps(ok)) == 0xFF;
      };
      __m256 f;
      if (__builtin_expect(all_below(c15), 1)) {
        f = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, q), _mm256_permutevar8x32_ps(t1, q),
                             _mm256_castsi256_ps(_mm256_cmpgt_epi32(q, c7)));
      } else if (all_below(last)) {
        alignas(32) int32_t qa[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(qa), q);
        f = _mm256_set_ps(tab[qa[7]], tab[qa[6]], tab[qa[5]], tab[qa[4]], tab[qa[3]], tab[qa[2]], tab[qa[1]], tab[qa[0]]);
      } else {
        alignas(32) float fb[8];
        for (int u = 0; u < 8; ++u) fb[u] = f_at(in[i + j + u]);
        f = _mm256_load_ps(fb);
      }
      if (Noisy) f = _mm256_add_ps(f, _mm256_load_ps(nz + j));
      out.put8(i + j, v.output(f));
    }
    i += m;
  }
#endif
  for (; i < n; ++i) out.put(i, finish<Noisy>(f_at(in[i]), Noisy ? mc[i] : 0u, k));
}

template <typename Sink>
inline void convert_any(bool identity, bool noisy, const float* in, const Sink& out, const uint32_t* mc, int64_t n,
                        const Column& k, const float* pairs) {
  if (identity) {
    if (noisy) convert<true, true>(in, out, mc, n, k, pairs);
    else convert<true, false>(in, out, mc, n, k, pairs);
  } else {
    if (noisy) convert<false, true>(in, out, mc, n, k, pairs);
    else convert<false, false>(in, out, mc, n, k, pairs);
  }
}

// The inputs of an ideal conversion (s, scale, zero_point) and its range.
struct Ideal {
  const float* sp;
  Shape4 sh;
  ColParam sc, zp;
  float top;

  Ideal(Ort::KernelContext& ctx, const char* op, int64_t bits) {
    auto s = ctx.GetInput(0);
    sh = shape_of(s.GetTensorTypeAndShapeInfo().GetShape());
    sp = s.GetTensorData<float>();
    sc = col_param(ctx, 1, sh.cols, op, "scale");
    zp = col_param(ctx, 2, sh.cols, op, "zero_point");
    top = std::pow(2.0f, static_cast<float>(bits)) - 1.0f;
  }

  // convert row r, column c (sh.inner values) into ``out`` (a Store or Accumulate)
  template <typename Sink>
  void run(int64_t r, int64_t c, const Sink& out) const {
    adc_ideal(sp + (r * sh.cols + c) * sh.inner, out, sh.inner, sc.at(c), zp.at(c), top);
  }
};

// The row key of the noise reads this many partial sums of the row (KEY_VALUES in runtime/ops.py).
constexpr int64_t kKeyValues = 4096;

// Everything a non-ideal conversion needs besides its column: the per-row noise
// keys (one pass over the partial sums), the mixed counters, the curve.
struct NonIdeal {
  const float* sp;
  Shape4 sh;
  ColParam sc, zp, gn, of;
  std::vector<float> pairs;  // {lut[k], lut[k+1] - lut[k]} per segment k
  std::vector<float> seg_lo, seg_dl;   // the same as two tables of 64 (Column::lo, dl), for <= 64 levels
  float top, ss;
  bool noisy, identity;
  std::vector<uint32_t> key, mixed_counter;
  uint32_t seed_mix = 0;
  std::vector<float> tab;  // per column: the curve's output for s = 0 .. ntab-1 (convert_tabulated)
  int32_t ntab = 0;        // 0: no table

  // ``first``: the input index of ``scale`` (gain, offset, lut follow zero_point).  ``shape``:
  // the partial sums' shape; ``data`` null when the partial sums are made later, a row at a
  // time (the fused array op): then no keys are computed here (row_key) and no table is built.
  NonIdeal(Ort::KernelContext& ctx, const char* op, int64_t bits, int64_t seed, float sigma, size_t first,
           const std::vector<int64_t>& shape, const float* data) {
    sh = shape_of(shape);
    sp = data;
    sc = col_param(ctx, first, sh.cols, op, "scale");
    zp = col_param(ctx, first + 1, sh.cols, op, "zero_point");
    gn = col_param(ctx, first + 2, sh.cols, op, "gain");
    of = col_param(ctx, first + 3, sh.cols, op, "offset");
    auto lutv = ctx.GetInput(first + 4);
    const float* lut = lutv.GetTensorData<float>();
    const int64_t L = lutv.GetTensorTypeAndShapeInfo().GetElementCount();
    top = std::pow(2.0f, static_cast<float>(bits)) - 1.0f;
    if (L != static_cast<int64_t>(top) + 1)
      ORT_CXX_API_THROW(std::string(op) + ": lut must hold 2^bits levels", ORT_INVALID_ARGUMENT);
    identity = true;
    for (int64_t k = 0; k < L; ++k) identity = identity && lut[k] == static_cast<float>(k);
    if (!identity) {
      pairs.resize(2 * L);
      for (int64_t k = 0; k + 1 < L; ++k) {
        pairs[2 * k] = lut[k];
        pairs[2 * k + 1] = lut[k + 1] - lut[k];
      }
      if (L <= 64) {
        seg_lo.assign(64, 0.0f);
        seg_dl.assign(64, 0.0f);
        for (int64_t k = 0; k + 1 < L; ++k) {
          seg_lo[k] = pairs[2 * k];
          seg_dl[k] = pairs[2 * k + 1];
        }
      }
    }
    noisy = sigma > 0.0f;
    ss = sigma * 1.7320508f;
    seed_mix = mix32(static_cast<uint32_t>(seed));
    const int64_t row = sh.cols * sh.inner;
    if (noisy) {
      mixed_counter.resize(row);
      for (int64_t i = 0; i < row; ++i) mixed_counter[i] = mix32(static_cast<uint32_t>(i));
    }
    if (sp == nullptr) return;
    if (!identity && table_pays()) tabulate(ctx);
    key.assign(sh.rows, 0);
    if (noisy) parallel(ctx, sh.rows, [&](int64_t r) { key[r] = row_key(sp + r * row); });
  }

  NonIdeal(Ort::KernelContext& ctx, const char* op, int64_t bits, int64_t seed, float sigma)
      : NonIdeal(ctx, op, bits, seed, sigma, 1, ctx.GetInput(0).GetTensorTypeAndShapeInfo().GetShape(),
                 ctx.GetInput(0).GetTensorData<float>()) {}

  // The noise key of a row of partial sums: sum of floor(16 s) over its first kKeyValues
  // values, in four float64 partial sums of integers (exact, so order-free).
  uint32_t row_key(const float* __restrict in) const {
    const int64_t nk = std::min(sh.cols * sh.inner, kKeyValues);
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    int64_t i = 0;
    for (; i + 4 <= nk; i += 4) {
      a0 += std::floor(static_cast<double>(in[i]) * 16.0);
      a1 += std::floor(static_cast<double>(in[i + 1]) * 16.0);
      a2 += std::floor(static_cast<double>(in[i + 2]) * 16.0);
      a3 += std::floor(static_cast<double>(in[i + 3]) * 16.0);
    }
    for (; i < nk; ++i) a0 += std::floor(static_cast<double>(in[i]) * 16.0);
    const double acc = (a0 + a1) + (a2 + a3);
    uint64_t mag = static_cast<uint64_t>(std::fmod(std::fabs(acc), 4294967296.0));
    return mix32(static_cast<uint32_t>(mag) + seed_mix);
  }

  // A table pays where most groups of eight values take its fast path (integral,
  // in [0, 15]): judged on the first 1024 values of up to 16 rows spread over the
  // batch, and where each column's table serves at least 4 values per entry.
  bool table_pays() const {
    const int64_t nr = std::min<int64_t>(sh.rows, 16);
    std::vector<const float*> rows(nr);
    for (int64_t j = 0; j < nr; ++j) rows[j] = sp + (j * sh.rows / nr) * sh.cols * sh.inner;
    return table_pays(rows);
  }

  // the same judgement on the given rows (the fused op: its first plane's)
  bool table_pays(const std::vector<const float*>& rows) const {
    const int64_t row = sh.cols * sh.inner, nv = std::min<int64_t>(row, 1024) & ~int64_t{7};
    int64_t groups = 0, fast = 0;
    for (const float* in : rows) {
      for (int64_t i = 0; i < nv; i += 8) {
        bool ok = true;
        for (int64_t u = 0; u < 8; ++u) ok = ok && tabulated(in[i + u], 16);
        groups += 1;
        fast += ok;
      }
    }
    return groups > 0 && 4 * fast >= 3 * groups;
  }

  // ntab covers s up to the top of every column's range (where g * (s / d) + o + z
  // passes top + 1), at least 16 and at most 1024 entries; larger s take the curve's steps
  void tabulate(Ort::KernelContext& ctx) {
    float smax = 0.0f;
    for (int64_t c = 0; c < sh.cols; ++c) {
      const float st = (top + 1.0f - of.at(c) - zp.at(c)) * sc.at(c) / gn.at(c);
      if (std::isfinite(st)) smax = std::max(smax, st);
    }
    const int32_t n = static_cast<int32_t>(std::max(16.0f, std::min(smax + 2.0f, 1024.0f)));
    if (sh.rows * sh.inner < 4 * static_cast<int64_t>(n)) return;
    ntab = n;
    tab.resize(sh.cols * ntab);
    parallel(ctx, sh.cols, [&](int64_t c) {
      const Column col{sc.at(c), zp.at(c), gn.at(c), of.at(c), top, ss, 0};
      for (int32_t q = 0; q < ntab; ++q) tab[c * ntab + q] = curve_in<false>(static_cast<float>(q), col, pairs.data());
    });
  }

  // convert row r, column c into out (sh.inner values)
  template <typename Sink>
  void run(int64_t r, int64_t c, const Sink& out) const {
    run_range(sp + r * sh.cols * sh.inner, c, 0, sh.inner, noisy ? key[r] : 0u, out);
  }

  // convert values n0 .. n0+len-1 of column c of ``row`` (a whole row of partial sums) whose
  // key is ``rkey`` into out[0 .. len-1]
  template <typename Sink>
  void run_range(const float* row, int64_t c, int64_t n0, int64_t len, uint32_t rkey, const Sink& out) const {
    Column col{sc.at(c), zp.at(c), gn.at(c), of.at(c), top, ss, rkey,
               seg_lo.empty() ? nullptr : seg_lo.data(), seg_dl.empty() ? nullptr : seg_dl.data()};
    const uint32_t* mc = noisy ? mixed_counter.data() + c * sh.inner + n0 : nullptr;
    const float* in = row + c * sh.inner + n0;
    if (ntab > 0) {
      const float* t = tab.data() + c * ntab;
      if (noisy) convert_tabulated<true>(in, out, mc, len, col, pairs.data(), t, ntab);
      else convert_tabulated<false>(in, out, mc, len, col, pairs.data(), t, ntab);
      return;
    }
    convert_any(identity, noisy, in, out, mc, len, col, pairs.data());
  }
};

// Recombination: y[b, g*coutg + o] = sum over planes, tiles, slices (in that fixed
// order, float64) of k * column((p, b), (g, t, s, o)).  One task takes an image, a
// group and a run of out channels, and reads each (plane, tile, slice) block of
// its columns in memory order (o innermost), so s streams through the caches
// instead of jumping a whole block between 4 KiB columns; the accumulators
// (channels x inner doubles, at most kAccBytes) stay in L2.  ``add(row, col,
// AddTerm<double>{acc, acc, k})`` adds one column's (converted) values times k into acc.
// A group's channels are cut into runs to keep the accumulators within kAccBytes
// and to give small batches at least kMinTasks tasks.
struct RecombineDims {
  int64_t P, G, T, S;
};

constexpr int64_t kMinTasks = 64;
constexpr int64_t kAccBytes = 256 * 1024;

template <typename Add>
void recombine(Ort::KernelContext& ctx, const RecombineDims& d, int64_t B, int64_t coutg, int64_t inner,
               const float* coef, float* y, Add&& add) {
  if (B * d.G * coutg * inner == 0) return;  // an empty batch (or output): nothing to do, nothing to divide by
  const int64_t for_tasks = (kMinTasks + B * d.G - 1) / (B * d.G);
  const int64_t for_cache = (coutg * inner * static_cast<int64_t>(sizeof(double)) + kAccBytes - 1) / kAccBytes;
  const int64_t runs = std::min(coutg, std::max<int64_t>(1, std::max(for_tasks, for_cache)));
  parallel(ctx, B * d.G * runs, [&](int64_t task) {
    thread_local std::vector<double> acc;
    const int64_t bg = task / runs, run = task % runs, b = bg / d.G, g = bg % d.G;
    const int64_t o0 = run * coutg / runs, o1 = (run + 1) * coutg / runs;
    acc.assign((o1 - o0) * inner, 0.0);
    for (int64_t p = 0; p < d.P; ++p)
      for (int64_t t = 0; t < d.T; ++t)
        for (int64_t s = 0; s < d.S; ++s) {
          const double k = static_cast<double>(coef[p * d.S + s]);
          const int64_t col0 = ((g * d.T + t) * d.S + s) * coutg;
          for (int64_t o = o0; o < o1; ++o) add(p * B + b, col0 + o, AddTerm<double>{acc.data() + (o - o0) * inner, acc.data() + (o - o0) * inner, k});
        }
    float* out = y + ((b * d.G + g) * coutg + o0) * inner;
    for (int64_t i = 0; i < (o1 - o0) * inner; ++i) out[i] = static_cast<float>(acc[i]);
  });
}

RecombineDims recombine_dims(const OrtKernelInfo* info) {
  Ort::ConstKernelInfo ki(info);
  return {ki.GetAttribute<int64_t>("planes"), ki.GetAttribute<int64_t>("groups"), ki.GetAttribute<int64_t>("tiles"),
          ki.GetAttribute<int64_t>("slices")};
}

// Output (B, G*coutg, ...) of a recombination over input shape ``shape``.
float* recombine_output(Ort::KernelContext& ctx, std::vector<int64_t> shape, const RecombineDims& d, const char* op,
                        int64_t& B, int64_t& coutg) {
  Shape4 sh = shape_of(shape);
  if (sh.rows % d.P != 0 || sh.cols % (d.G * d.T * d.S) != 0)
    ORT_CXX_API_THROW(std::string(op) + ": input shape does not match planes/groups/tiles/slices", ORT_INVALID_ARGUMENT);
  B = sh.rows / d.P;
  coutg = sh.cols / (d.G * d.T * d.S);
  shape[0] = B;
  shape[1] = d.G * coutg;
  return ctx.GetOutput(0, shape).GetTensorMutableData<float>();
}

// ------------------------------------------------------------------ QuantizeInput
struct QuantizeInputKernel {
  static constexpr int kInt64Input = -1;  // no int64 input
  int64_t bits, sign;
  QuantizeInputKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    bits = ki.GetAttribute<int64_t>("bits");
    sign = ki.GetAttribute<int64_t>("signed");
  }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0);
    auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
    const float* xp = x.GetTensorData<float>();
    const float scale = ctx.GetInput(1).GetTensorData<float>()[0];
    float* y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    const float full = std::pow(2.0f, static_cast<float>(bits));
    const float shift = static_cast<float>(sign) * std::pow(2.0f, static_cast<float>(bits) - 1.0f);
    const float lo = -shift, hi = (full - 1.0f) - shift;
    const int64_t n = shape_of(shape).total, block = 16384;
    parallel(ctx, (n + block - 1) / block, [&](int64_t b) {
      for (int64_t i = b * block, e = std::min(n, i + block); i < e; ++i)
        y[i] = std::min(std::max(std::nearbyint(xp[i] / scale), lo), hi);
    });
  }
};

// ------------------------------------------------------------------ BitPlanes
struct BitPlanesKernel {
  static constexpr int kInt64Input = -1;  // no int64 input
  int64_t bits;
  BitPlanesKernel(const OrtApi&, const OrtKernelInfo* info) {
    bits = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("bits");
  }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto q = ctx.GetInput(0);
    auto shape = q.GetTensorTypeAndShapeInfo().GetShape();
    const float* qp = q.GetTensorData<float>();
    auto oshape = shape;
    oshape[0] *= bits;
    float* y = ctx.GetOutput(0, oshape).GetTensorMutableData<float>();
    const int64_t n = shape_of(shape).total, block = 16384;
    const float full = std::pow(2.0f, static_cast<float>(bits));
    const int64_t nb = (n + block - 1) / block;
    parallel(ctx, nb, [&](int64_t b) {
      int64_t i = b * block;
      const int64_t e = std::min(n, i + block);
#if defined(__AVX512F__)
      // sixteen at a time, the same steps: u = q < 0 ? q + 2^bits : q, bit p of int(u)
      const __m512 vfull = _mm512_set1_ps(full), zero = _mm512_setzero_ps();
      const __m512i one = _mm512_set1_epi32(1);
      for (; bits <= 24 && i + 16 <= e; i += 16) {
        const __m512 q = _mm512_loadu_ps(qp + i);
        const __m512 u = _mm512_mask_add_ps(q, _mm512_cmp_ps_mask(q, zero, _CMP_LT_OQ), q, vfull);
        const __m512i v = _mm512_cvttps_epi32(u);
        for (int64_t p = 0; p < bits; ++p)
          _mm512_storeu_ps(y + p * n + i,
                           _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, static_cast<unsigned>(p)), one)));
      }
#endif
      for (; i < e; ++i) {
        float u = qp[i] < 0.0f ? qp[i] + full : qp[i];
        int64_t v = static_cast<int64_t>(u);
        for (int64_t p = 0; p < bits; ++p) y[p * n + i] = static_cast<float>((v >> p) & 1);
      }
    });
  }
};

// ------------------------------------------------------------------ AdcQuantize
struct AdcKernel {
  static constexpr int kInt64Input = -1;  // no int64 input
  int64_t bits;
  AdcKernel(const OrtApi&, const OrtKernelInfo* info) { bits = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("bits"); }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ideal adc(ctx, "AdcQuantize", bits);
    auto shape = ctx.GetInput(0).GetTensorTypeAndShapeInfo().GetShape();
    float* y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    parallel(ctx, adc.sh.rows * adc.sh.cols, [&](int64_t rc) {
      adc.run(rc / adc.sh.cols, rc % adc.sh.cols, Store{y + rc * adc.sh.inner});
    });
  }
};

// ------------------------------------------------------------------ AdcQuantizeNonIdeal
// Attributes of the non-ideal conversion ops.
struct NonIdealAttrs {
  int64_t bits, seed;
  float sigma;
  explicit NonIdealAttrs(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    bits = ki.GetAttribute<int64_t>("bits");
    seed = ki.GetAttribute<int64_t>("seed");
    sigma = ki.GetAttribute<float>("noise_sigma");
  }
};

struct AdcNonIdealKernel : NonIdealAttrs {
  static constexpr int kInt64Input = -1;  // no int64 input
  AdcNonIdealKernel(const OrtApi&, const OrtKernelInfo* info) : NonIdealAttrs(info) {}
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    NonIdeal ni(ctx, "AdcQuantizeNonIdeal", bits, seed, sigma);
    auto shape = ctx.GetInput(0).GetTensorTypeAndShapeInfo().GetShape();
    float* y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    parallel(ctx, ni.sh.rows * ni.sh.cols, [&](int64_t rc) {
      ni.run(rc / ni.sh.cols, rc % ni.sh.cols, Store{y + rc * ni.sh.inner});
    });
  }
};

// ------------------------------------------------------------------ Recombine
struct RecombineKernel {
  static constexpr int kInt64Input = -1;  // no int64 input
  RecombineDims d;
  RecombineKernel(const OrtApi&, const OrtKernelInfo* info) : d(recombine_dims(info)) {}
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto a = ctx.GetInput(0);
    auto shape = a.GetTensorTypeAndShapeInfo().GetShape();
    Shape4 sh = shape_of(shape);
    const float* ap = a.GetTensorData<float>();
    const float* coef = ctx.GetInput(1).GetTensorData<float>();
    int64_t B, coutg;
    float* y = recombine_output(ctx, shape, d, "Recombine", B, coutg);
    recombine(ctx, d, B, coutg, sh.inner, coef, y, [&](int64_t row, int64_t col, const AddTerm<double>& a) {
      const float* in = ap + (row * sh.cols + col) * sh.inner;
      for (int64_t i = 0; i < sh.inner; ++i) a.put(i, in[i]);
    });
  }
};

// ------------------------------------------------------------------ AdcRecombine (fused)
// Recombine(convert(s)): ``Conversion`` (Ideal or NonIdeal) converts one column of
// one row straight into the float64 accumulator; s is read once.
template <typename Conversion>
void convert_and_recombine(Ort::KernelContext& ctx, const Conversion& conv, const RecombineDims& d, size_t coef_input,
                           const char* op) {
  auto shape = ctx.GetInput(0).GetTensorTypeAndShapeInfo().GetShape();
  const float* coef = ctx.GetInput(coef_input).GetTensorData<float>();
  int64_t B, coutg;
  float* y = recombine_output(ctx, shape, d, op, B, coutg);
  recombine(ctx, d, B, coutg, conv.sh.inner, coef, y,
            [&](int64_t row, int64_t col, const AddTerm<double>& a) { conv.run(row, col, a); });
}

struct AdcRecombineKernel {
  static constexpr int kInt64Input = -1;  // no int64 input
  int64_t bits;
  RecombineDims d;
  AdcRecombineKernel(const OrtApi&, const OrtKernelInfo* info)
      : bits(Ort::ConstKernelInfo(info).GetAttribute<int64_t>("bits")), d(recombine_dims(info)) {}
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    convert_and_recombine(ctx, Ideal(ctx, "AdcRecombine", bits), d, 3, "AdcRecombine");
  }
};

struct AdcRecombineNonIdealKernel : NonIdealAttrs {
  static constexpr int kInt64Input = -1;  // no int64 input
  RecombineDims d;
  AdcRecombineNonIdealKernel(const OrtApi&, const OrtKernelInfo* info) : NonIdealAttrs(info), d(recombine_dims(info)) {}
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    convert_and_recombine(ctx, NonIdeal(ctx, "AdcRecombineNonIdeal", bits, seed, sigma), d, 6, "AdcRecombineNonIdeal");
  }
};

// ------------------------------------------------------------------ ConvAdcRecombine (fused array op)
// AdcRecombine(Conv(x, w), ...) (and its non-ideal twin) in one pass, for integer inputs
// of at most 8 bits (unsigned, or signed shifted by +128) and integer cell weights in
// [-128, 127]: per image, each plane's patches are packed as bytes, multiplied by the
// weight columns with exact int32 accumulation (AVX-512 VNNI vpdpbusd where the CPU has it,
// a portable loop otherwise: integer sums are exact, so both give the same values), and
// each column is converted and added into the float64 accumulator of its output channel
// while it is still in cache.  The partial sums equal the float Conv's (integers below
// 2^24 are exact in float32), and the conversion and recombination are the code of
// AdcRecombine, in the same order: the results are bit identical to the function body.
struct ConvGeom {
  int64_t C, H, W, M, Cg, KH, KW, G, Mg, K, Kq, OH, OW, N, NB;
  int64_t sh, sw, ph, pw, dh, dw;
};

struct ConvAttrs {
  int64_t group, x_signed, x_bits;
  std::vector<int64_t> strides, pads, dilations;
  explicit ConvAttrs(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    group = ki.GetAttribute<int64_t>("group");
    x_signed = ki.GetAttribute<int64_t>("x_signed");
    x_bits = ki.GetAttribute<int64_t>("x_bits");
    strides = ki.GetAttributes<int64_t>("strides");
    pads = ki.GetAttributes<int64_t>("pads");
    dilations = ki.GetAttributes<int64_t>("dilations");
    relu = ki.GetAttribute<int64_t>("relu");
  }
  int64_t relu = 0;
};

ConvGeom conv_geom(const std::vector<int64_t>& xs, const std::vector<int64_t>& ws, const ConvAttrs& a, const char* op) {
  if (xs.size() != 4 || ws.size() != 4 || a.strides.size() != 2 || a.pads.size() != 4 || a.dilations.size() != 2)
    ORT_CXX_API_THROW(std::string(op) + ": 2-D convolutions only (4-D x and w; strides, pads, dilations)",
                      ORT_INVALID_ARGUMENT);
  ConvGeom g{};
  g.C = xs[1]; g.H = xs[2]; g.W = xs[3];
  g.M = ws[0]; g.Cg = ws[1]; g.KH = ws[2]; g.KW = ws[3];
  g.G = a.group;
  if (g.G <= 0 || g.C != g.Cg * g.G || g.M % g.G != 0)
    ORT_CXX_API_THROW(std::string(op) + ": x channels, w shape and group do not match", ORT_INVALID_ARGUMENT);
  g.Mg = g.M / g.G;
  g.K = g.Cg * g.KH * g.KW;
  g.Kq = (g.K + 3) / 4;
  g.sh = a.strides[0]; g.sw = a.strides[1];
  g.ph = a.pads[0]; g.pw = a.pads[1];
  g.dh = a.dilations[0]; g.dw = a.dilations[1];
  g.OH = (g.H + a.pads[0] + a.pads[2] - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + a.pads[1] + a.pads[3] - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  if (g.OH <= 0 || g.OW <= 0) ORT_CXX_API_THROW(std::string(op) + ": empty output", ORT_INVALID_ARGUMENT);
  g.N = g.OH * g.OW;
  g.NB = (g.N + 15) / 16;
  return g;
}

// Two ways of feeding the byte products, both reading 4 input bytes per int32 lane and 16
// output pixels per 64-byte vector:
// * direct (stride 1): the input plane is stored as [channel/4][padded row][padded column][4];
//   pixel n' = oh * Wp + ow of a padded-width output row then reads, for kernel tap (i, j) and
//   channel quad cq, the 64 contiguous bytes at ((cq * Hp + oh + i*dh) * Wp + ow + j*dw) * 4:
//   no patch copy (the Wp - OW columns past each row are computed and dropped);
// * patches (other strides): the patches are copied, a[(nb * Kq + kq) * 64 + lane * 4 + u] =
//   input value k = 4 kq + u of output pixel n = 16 nb + lane.
struct Plan {
  bool direct;
  int64_t Kq;            // 4-byte groups per weight row
  int64_t Hp, Wp, Cgq;   // direct: padded plane, channel quads per group
  int64_t NB;            // 16-pixel blocks computed
  int64_t nb_stride;     // bytes between pixel blocks in the feed
  int64_t feed_bytes;    // one group's feed
  std::vector<int64_t> off;  // byte offset of each 4-byte group kq in the feed
  int64_t pixel(int64_t oh, int64_t ow, const ConvGeom& g) const { return direct ? oh * Wp + ow : oh * g.OW + ow; }
};

Plan plan_of(const ConvGeom& g) {
  Plan p{};
  p.direct = g.sh == 1 && g.sw == 1;
  if (p.direct) {
    p.Cgq = (g.Cg + 3) / 4;
    p.Hp = g.H + g.ph + (g.OH - 1 + g.dh * (g.KH - 1) + 1 - g.H - g.ph > 0 ? g.OH + g.dh * (g.KH - 1) - g.H - g.ph : 0);
    p.Wp = g.W + g.pw + std::max<int64_t>(0, g.OW + g.dw * (g.KW - 1) - g.W - g.pw);
    p.Hp = std::max(p.Hp, g.OH + g.dh * (g.KH - 1));
    p.Kq = p.Cgq * g.KH * g.KW;
    p.NB = ((g.OH - 1) * p.Wp + g.OW + 15) / 16;
    p.nb_stride = 64;
    p.off.resize(p.Kq);
    for (int64_t cq = 0; cq < p.Cgq; ++cq)
      for (int64_t i = 0; i < g.KH; ++i)
        for (int64_t j = 0; j < g.KW; ++j)
          p.off[(cq * g.KH + i) * g.KW + j] = ((cq * p.Hp + i * g.dh) * p.Wp + j * g.dw) * 4;
    // the last block may read up to 16 pixels past the plane: slack after it
    p.feed_bytes = p.Cgq * p.Hp * p.Wp * 4 + p.NB * 64 + 64;
  } else {
    p.Kq = g.Kq;
    p.NB = g.NB;
    p.nb_stride = g.Kq * 64;
    p.off.resize(p.Kq);
    for (int64_t kq = 0; kq < p.Kq; ++kq) p.off[kq] = kq * 64;
    p.feed_bytes = p.NB * p.Kq * 64;
  }
  return p;
}

// The weights as bytes, [group][row][kq][4] in the plan's k order (zeros where no input is),
// and each row's sum (for the +128 shift of signed inputs).
struct PackedWeights {
  std::vector<int8_t> w;
  std::vector<int32_t> rowsum;
  PackedWeights(const float* wf, const ConvGeom& g, const Plan& pl, const char* op)
      : w(g.M * pl.Kq * 4, 0), rowsum(g.M, 0) {
    for (int64_t m = 0; m < g.M; ++m)
      for (int64_t k = 0; k < g.K; ++k) {
        const float v = wf[m * g.K + k];
        if (!(v >= -128.0f && v <= 127.0f) || v != std::nearbyint(v))
          ORT_CXX_API_THROW(std::string(op) + ": weights must be integers in [-128, 127]", ORT_INVALID_ARGUMENT);
        int64_t pos = k;
        if (pl.direct) {
          const int64_t c = k / (g.KH * g.KW), i = (k / g.KW) % g.KH, j = k % g.KW;
          pos = ((c / 4) * g.KH * g.KW + i * g.KW + j) * 4 + c % 4;
        }
        w[m * pl.Kq * 4 + pos] = static_cast<int8_t>(v);
        rowsum[m] += static_cast<int32_t>(v);
      }
  }
};

// The fused op's input quantization, QuantizeInput's steps: q = min(max(round(x / xs), lo), hi)
// with [lo, hi] from x_bits and x_signed; x / 1 = x, so the division is skipped where xs is 1.
// q is stored as a byte q + shift (128 for signed inputs, 0 for unsigned ones).  A NaN input has
// no byte: the kernel throws.
struct InQuant {
  float xs, lo, hi;
  bool one;
  int32_t shift;
  InQuant(float scale, int64_t bits, int64_t sign, const char* op) : xs(scale), one(scale == 1.0f) {
    if (bits < 1 || bits > 8) ORT_CXX_API_THROW(std::string(op) + ": x_bits must lie in [1, 8]", ORT_INVALID_ARGUMENT);
    const float full = std::pow(2.0f, static_cast<float>(bits));
    const float sh = static_cast<float>(sign) * std::pow(2.0f, static_cast<float>(bits) - 1.0f);
    lo = -sh;
    hi = (full - 1.0f) - sh;
    shift = sign ? 128 : 0;
  }
  float q(float v) const { return std::min(std::max(std::nearbyint(one ? v : v / xs), lo), hi); }
#if defined(__AVX512F__)
  // q of sixteen values; lanes whose rounded value is NaN are or-ed into bad
  __m512 q16(__m512 v, __mmask16& bad) const {
    if (!one) v = _mm512_div_ps(v, _mm512_set1_ps(xs));
    const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    bad |= _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    return _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
  }
#endif
};

// n values of a row quantized (InQuant) into bytes q + shift at dst; returns 1 on a NaN.
inline int32_t quant_row(const float* __restrict src, int64_t n, const InQuant& iq, uint8_t* __restrict dst) {
  int64_t i = 0;
  int32_t bad = 0;
#if defined(__AVX512F__)
  const __m512i vsh = _mm512_set1_epi32(iq.shift);
  __mmask16 badm = 0;
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 q = iq.q16(_mm512_maskz_loadu_ps(m, src + i), badm);
    _mm_mask_storeu_epi8(dst + i, m, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvttps_epi32(q), vsh)));
  }
  bad |= badm != 0;
#endif
  for (; i < n; ++i) {
    const float q = iq.q(src[i]);
    bad |= static_cast<int32_t>(q != q);
    dst[i] = q == q ? static_cast<uint8_t>(static_cast<int32_t>(q) + iq.shift) : 0;
  }
  return bad;
}

// Group grp's feed (see Plan) from the float plane x (cx x H x W; conv input channel c is x's
// channel chan[c], a zero channel where that is cx or -1), each value quantized (InQuant) and
// stored + shift; padding holds the shift (an input 0), k past the row and pixels past the
// plane whatever is there (their weights are 0, their outputs dropped).  Throws on NaN.
void feed(const float* __restrict x, const int64_t* chan, int64_t cx, const ConvGeom& g, const Plan& pl, int64_t grp,
          const InQuant& iq, uint8_t* __restrict a, const char* op) {
  const int32_t shift = iq.shift;
  const uint8_t pad = static_cast<uint8_t>(shift);
  int32_t bad = 0;
  if (pl.direct) {
    std::fill(a, a + pl.feed_bytes, pad);
    // four channels at a time, one 32-bit word per pixel (channels past Cg read a zero row)
    thread_local std::vector<float> zeros;
    zeros.assign(g.W, 0.0f);
    const uint32_t sh = static_cast<uint32_t>(shift);
    for (int64_t cq = 0; cq < pl.Cgq; ++cq) {
      const float* src[4];
      int64_t step[4];
      for (int u = 0; u < 4; ++u) {
        const int64_t c = cq * 4 + u, k = c < g.Cg ? chan[grp * g.Cg + c] : -1;
        src[u] = k >= 0 && k < cx ? x + k * g.H * g.W : zeros.data();
        step[u] = k >= 0 && k < cx ? g.W : 0;
      }
      for (int64_t ih = 0; ih < g.H; ++ih) {
        uint8_t* d = a + ((cq * pl.Hp + ih + g.ph) * pl.Wp + g.pw) * 4;
        const float *s0 = src[0] + ih * step[0], *s1 = src[1] + ih * step[1], *s2 = src[2] + ih * step[2],
                    *s3 = src[3] + ih * step[3];
        int64_t iw = 0;
#if defined(__AVX512F__)
        const __m512i vsh = _mm512_set1_epi32(shift), ff = _mm512_set1_epi32(0xFF);
        __mmask16 badm = 0;
        for (; iw < g.W; iw += 16) {
          const __mmask16 in = g.W - iw >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (g.W - iw)) - 1u);
          __m512i word = _mm512_setzero_si512();
          const float* rows[4] = {s0, s1, s2, s3};
          for (int u = 0; u < 4; ++u) {
            const __m512 q = iq.q16(_mm512_maskz_loadu_ps(in, rows[u] + iw), badm);
            const __m512i b = _mm512_and_si512(_mm512_add_epi32(_mm512_cvttps_epi32(q), vsh), ff);
            word = _mm512_or_si512(word, _mm512_slli_epi32(b, 8 * u));
          }
          _mm512_mask_storeu_epi32(d + iw * 4, in, word);
        }
        bad |= badm != 0;
#endif
        for (; iw < g.W; ++iw) {
          const float q0 = iq.q(s0[iw]), q1 = iq.q(s1[iw]), q2 = iq.q(s2[iw]), q3 = iq.q(s3[iw]);
          bad |= static_cast<int32_t>(q0 != q0) | static_cast<int32_t>(q1 != q1) | static_cast<int32_t>(q2 != q2) |
                 static_cast<int32_t>(q3 != q3);
          if (bad) break;
          const uint32_t word = ((static_cast<uint32_t>(static_cast<int32_t>(q0)) + sh) & 0xFFu) |
                                (((static_cast<uint32_t>(static_cast<int32_t>(q1)) + sh) & 0xFFu) << 8) |
                                (((static_cast<uint32_t>(static_cast<int32_t>(q2)) + sh) & 0xFFu) << 16) |
                                (((static_cast<uint32_t>(static_cast<int32_t>(q3)) + sh) & 0xFFu) << 24);
          std::memcpy(d + iw * 4, &word, 4);
        }
      }
    }
  } else {
    // the group's channels quantized once into a padded byte plane (padding and zero channels
    // hold the shift: an input 0), then each patch value copied from it
    const int64_t Hp = std::max(g.H + g.ph, (g.OH - 1) * g.sh + (g.KH - 1) * g.dh + 1);
    const int64_t Wp = std::max(g.W + g.pw, (g.OW - 1) * g.sw + (g.KW - 1) * g.dw + 1);
    thread_local std::vector<uint8_t> plane_tls;
    plane_tls.assign(g.Cg * Hp * Wp, pad);
    uint8_t* qp = plane_tls.data();
    for (int64_t c = 0; c < g.Cg; ++c) {
      const int64_t ch = chan[grp * g.Cg + c];
      if (ch < 0 || ch >= cx) continue;
      for (int64_t ih = 0; ih < g.H; ++ih)
        bad |= quant_row(x + (ch * g.H + ih) * g.W, g.W, iq, qp + (c * Hp + ih + g.ph) * Wp + g.pw);
    }
    const int64_t khw = g.KH * g.KW;
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t c = k / khw, i = (k / g.KW) % g.KH, j = k % g.KW;
      const uint8_t* base = qp + (c * Hp + i * g.dh) * Wp + j * g.dw;
      uint8_t* dst = a + (k >> 2) * 64 + (k & 3);
      for (int64_t oh = 0, n = 0; oh < g.OH; ++oh) {
        const uint8_t* row = base + oh * g.sh * Wp;
        for (int64_t ow = 0; ow < g.OW; ++ow, ++n) dst[((n >> 4) * g.Kq) * 64 + (n & 15) * 4] = row[ow * g.sw];
      }
    }
  }
  if (bad) ORT_CXX_API_THROW(std::string(op) + ": inputs must not be NaN", ORT_INVALID_ARGUMENT);
}

// out[i * ld + 16 (nb0 + j) + lane] = sum over kq, u of feed(kq, pixel) * w(i, kq, u), for
// rows i < MR and pixel blocks nb0 .. nb0 + NBK - 1.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kVnni = true;
template <int MR, int NBK>
inline void gemm_block(const uint8_t* __restrict a, const int8_t* __restrict w, const Plan& pl, int64_t nb0,
                       int32_t* out, int64_t ld) {
  __m512i acc[MR][NBK];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NBK; ++j) acc[i][j] = _mm512_setzero_si512();
  const uint8_t* base = a + nb0 * pl.nb_stride;
  const int64_t* off = pl.off.data();
  for (int64_t kq = 0; kq < pl.Kq; ++kq) {
    __m512i av[NBK];
#pragma GCC unroll 4
    for (int j = 0; j < NBK; ++j) av[j] = _mm512_loadu_si512(base + j * pl.nb_stride + off[kq]);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t wv;
      std::memcpy(&wv, w + (i * pl.Kq + kq) * 4, 4);
      const __m512i bw = _mm512_set1_epi32(wv);
#pragma GCC unroll 4
      for (int j = 0; j < NBK; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av[j], bw);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NBK; ++j) _mm512_storeu_si512(out + i * ld + (nb0 + j) * 16, acc[i][j]);
}
#else
constexpr bool kVnni = false;
template <int MR, int NBK>
inline void gemm_block(const uint8_t* __restrict a, const int8_t* __restrict w, const Plan& pl, int64_t nb0,
                       int32_t* out, int64_t ld) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NBK; ++j) {
      int32_t acc[16] = {0};
      const uint8_t* ab = a + (nb0 + j) * pl.nb_stride;
      const int8_t* wr = w + i * pl.Kq * 4;
      for (int64_t kq = 0; kq < pl.Kq; ++kq) {
        const uint8_t* av = ab + pl.off[kq];
        for (int lane = 0; lane < 16; ++lane)
          for (int u = 0; u < 4; ++u)
            acc[lane] += static_cast<int32_t>(av[lane * 4 + u]) * static_cast<int32_t>(wr[kq * 4 + u]);
      }
      std::memcpy(out + i * ld + (nb0 + j) * 16, acc, sizeof acc);
    }
}
#endif

// Calls f(rows, blocks, m, nb) (rows and blocks as std::integral_constant) over Mg weight rows,
// 8 at a time and then the rest, and NB pixel blocks, 3 at a time and then the rest: the one
// blocking of both integer products (bytes and bits).
template <typename F>
void for_blocks(int64_t Mg, int64_t NB, F&& f) {
  auto rows = [&](auto mr, int64_t m) {
    int64_t nb = 0;
    for (; nb + 3 <= NB; nb += 3) f(mr, std::integral_constant<int, 3>{}, m, nb);
    if (NB - nb == 2) f(mr, std::integral_constant<int, 2>{}, m, nb);
    if (NB - nb == 1) f(mr, std::integral_constant<int, 1>{}, m, nb);
  };
  int64_t m = 0;
  for (; m + 8 <= Mg; m += 8) rows(std::integral_constant<int, 8>{}, m);
  switch (Mg - m) {
    case 7: rows(std::integral_constant<int, 7>{}, m); break;
    case 6: rows(std::integral_constant<int, 6>{}, m); break;
    case 5: rows(std::integral_constant<int, 5>{}, m); break;
    case 4: rows(std::integral_constant<int, 4>{}, m); break;
    case 3: rows(std::integral_constant<int, 3>{}, m); break;
    case 2: rows(std::integral_constant<int, 2>{}, m); break;
    case 1: rows(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// int32 products of Mg weight rows (from w) with a group's feed: out is Mg x (16 NB)
void gemm(const uint8_t* a, const int8_t* w, int64_t Mg, const Plan& pl, int32_t* out) {
  const int64_t ld = pl.NB * 16, wr = pl.Kq * 4;
  for_blocks(Mg, pl.NB, [&](auto mr, auto nbk, int64_t m, int64_t nb) {
    gemm_block<decltype(mr)::value, decltype(nbk)::value>(a, w + m * wr, pl, nb, out + m * ld, ld);
  });
}

// ---- binary products (bit planes times 1-bit cells): AND + popcount
// Where every input is 0 or 1 (x_bits = 1: bit planes) and every cell 0 or 1, a product is
// popcount(input bits & weight bits) over words of 32 k's.  Stride-1 convs only (the direct
// layout): the group's inputs go to a padded byte plane [channel][Hp][Wp]; pixel n' = oh * Wp
// + ow then reads k = (c, i, j) at byte n' + c*Hp*Wp + i*dh*Wp + j*dw, and its bits are packed
// 16 pixels at a time into words [pixel block][k / 32][16 lanes].  Counts are exact integers:
// the same int32 products as the byte path, so the epilogue is shared.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VPOPCNTDQ__)
constexpr bool kPopcount = true;
#else
constexpr bool kPopcount = false;
#endif

struct BinaryPlan {
  bool on = false;
  int64_t Kw = 0, plane_bytes = 0, words_bytes = 0;
  std::vector<int64_t> off;        // byte offset of k in the padded plane
  std::vector<uint32_t> w;         // [row][Kw] weight bits
};

BinaryPlan binary_plan(const float* wf, const ConvGeom& g, const Plan& pl, int64_t x_bits, int64_t x_signed) {
  BinaryPlan b;
  if (!kPopcount || x_bits != 1 || x_signed != 0 || !pl.direct) return b;
  for (int64_t i = 0; i < g.M * g.K; ++i)
    if (wf[i] != 0.0f && wf[i] != 1.0f) return b;
  b.on = true;
  b.Kw = (g.K + 31) / 32;
  b.plane_bytes = g.Cg * pl.Hp * pl.Wp + pl.NB * 16 + 64;
  b.words_bytes = pl.NB * b.Kw * 64;
  b.off.resize(g.K);
  for (int64_t k = 0; k < g.K; ++k) {
    const int64_t c = k / (g.KH * g.KW), i = (k / g.KW) % g.KH, j = k % g.KW;
    b.off[k] = c * pl.Hp * pl.Wp + i * g.dh * pl.Wp + j * g.dw;
  }
  b.w.assign(g.M * b.Kw, 0u);
  for (int64_t m = 0; m < g.M; ++m)
    for (int64_t k = 0; k < g.K; ++k)
      if (wf[m * g.K + k] != 0.0f) b.w[m * b.Kw + k / 32] |= 1u << (k % 32);
  return b;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VPOPCNTDQ__)
// Group grp's padded byte plane and its packed bit words (into a: plane, then words).
void feed_bits(const float* __restrict x, const int64_t* chan, int64_t cx, const ConvGeom& g, const Plan& pl,
               const BinaryPlan& bp, const InQuant& iq, int64_t grp, uint8_t* __restrict a, const char* op) {
  uint8_t* p8 = a;
  uint32_t* words = reinterpret_cast<uint32_t*>(a + ((bp.plane_bytes + 63) & ~int64_t{63}));
  std::fill(p8, p8 + bp.plane_bytes, uint8_t{0});
  __mmask16 bad = 0;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t c = 0; c < g.Cg; ++c) {
    const int64_t ch = chan[grp * g.Cg + c];
    if (ch < 0 || ch >= cx) continue;
    const float* src = x + ch * g.H * g.W;
    for (int64_t ih = 0; ih < g.H; ++ih) {
      uint8_t* d = p8 + (c * pl.Hp + ih + g.ph) * pl.Wp + g.pw;
      for (int64_t iw = 0; iw < g.W; iw += 16) {
        const __mmask16 in = g.W - iw >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (g.W - iw)) - 1u);
        const __m512 q = iq.q16(_mm512_maskz_loadu_ps(in, src + ih * g.W + iw), bad);
        const __mmask16 is1 = _mm512_cmp_ps_mask(q, one, _CMP_EQ_OQ);
        _mm_mask_storeu_epi8(d + iw, in, _mm_maskz_mov_epi8(is1, _mm_set1_epi8(1)));
      }
    }
  }
  if (bad) ORT_CXX_API_THROW(std::string(op) + ": inputs must not be NaN", ORT_INVALID_ARGUMENT);
  for (int64_t nb = 0; nb < pl.NB; ++nb)
    for (int64_t kw = 0; kw < bp.Kw; ++kw) {
      __m512i word = _mm512_setzero_si512();
      const int64_t k1 = std::min(g.K, (kw + 1) * 32);
      for (int64_t k = kw * 32; k < k1; ++k) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p8 + nb * 16 + bp.off[k])));
        word = _mm512_or_si512(word, _mm512_slli_epi32(v, static_cast<unsigned>(k - kw * 32)));
      }
      _mm512_storeu_si512(words + (nb * bp.Kw + kw) * 16, word);
    }
}

template <int MR, int NBK>
inline void popcount_block(const uint32_t* __restrict words, const uint32_t* __restrict w, int64_t Kw, int64_t nb0,
                           int32_t* out, int64_t ld) {
  __m512i acc[MR][NBK];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NBK; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t kw = 0; kw < Kw; ++kw) {
    __m512i av[NBK];
#pragma GCC unroll 4
    for (int j = 0; j < NBK; ++j) av[j] = _mm512_loadu_si512(words + ((nb0 + j) * Kw + kw) * 16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i bw = _mm512_set1_epi32(static_cast<int32_t>(w[i * Kw + kw]));
#pragma GCC unroll 4
      for (int j = 0; j < NBK; ++j)
        acc[i][j] = _mm512_add_epi32(acc[i][j], _mm512_popcnt_epi32(_mm512_and_si512(av[j], bw)));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NBK; ++j) _mm512_storeu_si512(out + i * ld + (nb0 + j) * 16, acc[i][j]);
}

void gemm_bits(const uint8_t* a, const BinaryPlan& bp, const uint32_t* w, int64_t Mg, const Plan& pl, int32_t* out) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(a + ((bp.plane_bytes + 63) & ~int64_t{63}));
  const int64_t ld = pl.NB * 16, K = bp.Kw;
  for_blocks(Mg, pl.NB, [&](auto mr, auto nbk, int64_t m, int64_t nb) {
    popcount_block<decltype(mr)::value, decltype(nbk)::value>(words, w + m * K, K, nb, out + m * ld, ld);
  });
}
#else
void feed_bits(const float*, const int64_t*, int64_t, const ConvGeom&, const Plan&, const BinaryPlan&, const InQuant&,
               int64_t, uint8_t*, const char*) {}
void gemm_bits(const uint8_t*, const BinaryPlan&, const uint32_t*, int64_t, const Plan&, int32_t*) {}
#endif

// The fused op's ``channels`` input: conv input channel c reads x's channel chan[c] (cx or -1:
// a zero channel); conv_shape is x's shape with the gathered channel count.
struct ChannelMap {
  const int64_t* chan;
  int64_t cx;
  std::vector<int64_t> conv_shape;
  ChannelMap(Ort::KernelContext& ctx, const std::vector<int64_t>& xs, const char* op) {
    auto cv = ctx.GetInput(1);
    chan = cv.GetTensorData<int64_t>();
    const int64_t n = cv.GetTensorTypeAndShapeInfo().GetElementCount();
    if (xs.size() != 4) ORT_CXX_API_THROW(std::string(op) + ": x must be 4-D", ORT_INVALID_ARGUMENT);
    cx = xs[1];
    for (int64_t i = 0; i < n; ++i)
      if (chan[i] < -1 || chan[i] > cx)
        ORT_CXX_API_THROW(std::string(op) + ": channels must lie in [-1, x channels]", ORT_INVALID_ARGUMENT);
    conv_shape = {xs[0], n, xs[2], xs[3]};
  }
};

// One plane's partial sums as the epilogue reads them: column c's int32 products at ci + c *
// ldc (pixel (oh, ow) at pl.pixel(oh, ow)), minus corr[c] (the +128 shift's share); and, where
// the conversion asks for it (a non-ideal ADC: its noise key reads the row as floats), the
// float32 row (column c, pixel n at row[c * N + n]).
struct PlaneView {
  const int32_t* ci;
  int64_t ldc;
  const int32_t* corr;
  const float* row;
  int64_t N;
};

// The column of term i = t * S + s (tile t, slice s) of output channel o of group gg in one plane's
// columns ((gg * T + t) * S + s) * coutg + o; its coefficient is coef[p * S + s].
inline int64_t term_column(const RecombineDims& d, int64_t gg, int64_t o, int64_t coutg, int64_t i) {
  return (gg * d.T * d.S + i) * coutg + o;
}

// Whether the float64 recombination sum of ``terms`` (1 or 2) converted values v (v = (code - z) *
// d, code - z an integer of magnitude <= 2^bits = top + 1) with coefficients k0, k1 equals a float32
// sum: one term with k = +-1 (float(0.0 + double(v) * k) = (v * k) + 0.0f: exact, and + 0.0f turns
// the -0.0 of 0 * -1 into the float64 sum's +0.0); two terms with k = +-1 whose values' exponents
// lie within 28 of each other (|v| <= 2^bits * d, a nonzero |v| >= d, 24-bit significands: the
// exact sum fits float64's 53 bits, so float(0.0 + v0 k0 + v1 k1) = ((v0 k0) + (v1 k1)) + 0.0f,
// rounded once either way).
inline bool float_sum_exact(int64_t terms, float k0, float k1, float d0, float d1, float top) {
  if (terms == 1) return std::fabs(k0) == 1.0f;
  if (terms != 2 || std::fabs(k0) != 1.0f || std::fabs(k1) != 1.0f) return false;
  const float lo = std::min(d0, d1), hi = std::max(d0, d1);
  return lo > 0.0f && std::isfinite(hi) &&
         static_cast<double>(hi) * (static_cast<double>(top) + 1.0) <= static_cast<double>(lo) * 134217728.0;  // 2^27
}

// The fused op's epilogue inputs after ``coef``: x_scale (one value: the input quantization,
// InQuant), then y = (addend + r) * out_scale + out_bias on the recombination r, three float32
// operations in that order (the body's Add, Mul, Add): addend one value or the output's shape
// (the earlier chunks' sum), out_scale and out_bias one value or one per output channel.
struct Epilogue {
  float xs;
  const float* add;
  bool add_full;
  const float* sc;
  const float* bi;
  bool sc_full, bi_full;
  const float* res;  // the residual: one value (-0.0: nothing added) or the output's shape
  bool res_full;
  bool relu;
  Epilogue(Ort::KernelContext& ctx, size_t i, const std::vector<int64_t>& yshape, const char* op, bool relu_)
      : relu(relu_) {
    auto count = [&](size_t k) { return ctx.GetInput(k).GetTensorTypeAndShapeInfo().GetElementCount(); };
    const int64_t cout = yshape[1];
    if (count(i) != 1) ORT_CXX_API_THROW(std::string(op) + ": x_scale must be one value", ORT_INVALID_ARGUMENT);
    xs = ctx.GetInput(i).GetTensorData<float>()[0];
    auto ash = ctx.GetInput(i + 1).GetTensorTypeAndShapeInfo().GetShape();
    add_full = count(i + 1) != 1;
    if (add_full && ash != yshape)
      ORT_CXX_API_THROW(std::string(op) + ": addend must be one value or of the output's shape", ORT_INVALID_ARGUMENT);
    add = ctx.GetInput(i + 1).GetTensorData<float>();
    for (size_t k : {i + 2, i + 3}) {
      auto sh = ctx.GetInput(k).GetTensorTypeAndShapeInfo().GetShape();
      const int64_t n = count(k);
      const bool per_channel = n == cout && sh.size() >= 3 && sh.size() <= 4 && sh[sh.size() - 3] == cout &&
                               sh[sh.size() - 2] == 1 && sh[sh.size() - 1] == 1;
      if (n != 1 && !per_channel)
        ORT_CXX_API_THROW(std::string(op) + (k == i + 2 ? ": out_scale" : ": out_bias") +
                              " must be one value or one per output channel ([1, C, 1, 1])",
                          ORT_INVALID_ARGUMENT);
    }
    sc = ctx.GetInput(i + 2).GetTensorData<float>();
    bi = ctx.GetInput(i + 3).GetTensorData<float>();
    sc_full = count(i + 2) != 1;
    bi_full = count(i + 3) != 1;
    res_full = count(i + 4) != 1;
    if (res_full && ctx.GetInput(i + 4).GetTensorTypeAndShapeInfo().GetShape() != yshape)
      ORT_CXX_API_THROW(std::string(op) + ": residual must be one value or of the output's shape", ORT_INVALID_ARGUMENT);
    res = ctx.GetInput(i + 4).GetTensorData<float>();
  }
  // channel c's residual (image b, n values per channel), or nullptr where it is the one value res[0]
  const float* residual(int64_t b, int64_t c, int64_t cout, int64_t n) const {
    return res_full ? res + (b * cout + c) * n : nullptr;
  }
  // the body's last steps: y + residual, then (relu) onnxruntime's Relu, x < 0 ? 0 : x
  float post(float y, float q) const {
    const float u = y + q;
    return relu && u < 0.0f ? 0.0f : u;
  }
  float scale(int64_t c) const { return sc[sc_full ? c : 0]; }
  float bias(int64_t c) const { return bi[bi_full ? c : 0]; }
  // channel c's addend (image b, n values per channel), or nullptr where it is the one value add[0]
  const float* addend(int64_t b, int64_t c, int64_t cout, int64_t n) const {
    return add_full ? add + (b * cout + c) * n : nullptr;
  }
  // y[i] = post(((addend + r[i]) * scale) + bias, residual) for i < n (a, q: the channel's addend and
  // residual at this offset, or nullptr for the one value).  y may be r (in place): no __restrict
  void apply(float* y, const float* r, const float* a, const float* q, int64_t c, int64_t n) const {
    const float s = scale(c), t = bias(c), a0 = add[0], q0 = res[0];
    for (int64_t i = 0; i < n; ++i)
      y[i] = post((((a != nullptr ? a[i] : a0) + r[i]) * s) + t, q != nullptr ? q[i] : q0);
  }
};

// Fused kernel body shared by the ideal and non-ideal ops.  ``conv`` provides ``kRow``
// (whether it reads the float row), ``prepare(ctx, row)`` (one look at image 0's first plane,
// before the parallel part), ``begin(view)`` (what a plane's conversions need: the noise key)
// and ``convert(view, c, n0, len, that, v)``: values n0 .. n0+len-1 of column c (pixels of the
// float row, or of the products' layout) converted into v.  Each output channel's pixels are
// taken kPixBlock at a time: the block's float64 sums stay in L1 while its (tile, slice)
// columns are added in AdcRecombine's order (planes, then tiles, then slices; acc += double(v)
// * k each), so the values are bit identical to it, and the last plane writes float32 directly.
constexpr int64_t kPixBlock = 64;

template <typename Conversion>
void conv_adc_recombine(Ort::KernelContext& ctx, const ConvAttrs& attrs, const RecombineDims& d, size_t coef_input,
                        const char* op, const Conversion& conv) {
  auto xv = ctx.GetInput(0);
  auto wv = ctx.GetInput(2);
  const auto xs = xv.GetTensorTypeAndShapeInfo().GetShape();
  const ChannelMap cm(ctx, xs, op);
  const ConvGeom g = conv_geom(cm.conv_shape, wv.GetTensorTypeAndShapeInfo().GetShape(), attrs, op);
  const Plan pl = plan_of(g);
  const PackedWeights pw(wv.GetTensorData<float>(), g, pl, op);
  const float* x = xv.GetTensorData<float>();
  const float* coef = ctx.GetInput(coef_input).GetTensorData<float>();
  int64_t B, coutg;
  float* y = recombine_output(ctx, {xs[0], g.M, g.OH, g.OW}, d, op, B, coutg);
  const int64_t cout = d.G * coutg, plane = cm.cx * g.H * g.W, ldc = pl.NB * 16;
  const Epilogue ep(ctx, coef_input + 1, {B, cout, g.OH, g.OW}, op, attrs.relu != 0);
  const InQuant iq(ep.xs, attrs.x_bits, attrs.x_signed, op);
  if (B * cout * g.N == 0) return;
  const int32_t shift = iq.shift;
  std::vector<int32_t> corr(g.M);
  for (int64_t c = 0; c < g.M; ++c) corr[c] = shift * pw.rowsum[c];
  // The pixel domain the epilogue walks: the compact map for a float-row conversion, else the
  // products' own (padded-row) layout, whose padding columns are converted too and dropped
  // when the last plane is written (cheaper than short segments of one output row each).
  const bool padded = !Conversion::kRow && pl.pixel(1, 0, g) != g.OW;
  // one plane: the conversions, their float64 sum, the epilogue and the store in one pass per
  // output row (Conversion::rows), without the pixel blocks' buffers
  const bool one_plane = Conversion::kRows && d.P == 1;
  const int64_t dom = padded ? pl.pixel(g.OH - 1, g.OW, g) : g.N;
  // products of one plane of image b, p into ci (M x ldc), and the float row if asked
  const BinaryPlan bp = binary_plan(wv.GetTensorData<float>(), g, pl, attrs.x_bits, attrs.x_signed);
  const int64_t feed_bytes = bp.on ? ((bp.plane_bytes + 63) & ~int64_t{63}) + bp.words_bytes : pl.feed_bytes;
  auto products = [&](int64_t r, uint8_t* a, int32_t* ci, float* srow) {
    for (int64_t grp = 0; grp < g.G; ++grp) {
      if (bp.on) {
        feed_bits(x + r * plane, cm.chan, cm.cx, g, pl, bp, iq, grp, a, op);
        gemm_bits(a, bp, bp.w.data() + grp * g.Mg * bp.Kw, g.Mg, pl, ci + grp * g.Mg * ldc);
        continue;
      }
      feed(x + r * plane, cm.chan, cm.cx, g, pl, grp, iq, a, op);
      gemm(a, pw.w.data() + grp * g.Mg * pl.Kq * 4, g.Mg, pl, ci + grp * g.Mg * ldc);
    }
    if (srow != nullptr)
      for (int64_t c = 0; c < g.M; ++c)
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const int32_t* sr = ci + c * ldc + pl.pixel(oh, 0, g);
          float* dst = srow + c * g.N + oh * g.OW;
          for (int64_t ow = 0; ow < g.OW; ++ow) dst[ow] = static_cast<float>(sr[ow] - corr[c]);
        }
  };
  if (Conversion::kRow) {   // the conversion's one look at real partial sums (image 0, plane 0)
    std::vector<uint8_t> a0(feed_bytes);
    std::vector<int32_t> c0(g.M * ldc);
    std::vector<float> r0(g.M * g.N);
    products(0, a0.data(), c0.data(), r0.data());
    conv.prepare(ctx, r0.data());
  }
  parallel(ctx, B, [&](int64_t b) {
    thread_local std::vector<uint8_t> a;
    thread_local std::vector<int32_t> ci;
    thread_local std::vector<float> srow;
    thread_local std::vector<double> acc;
    thread_local std::vector<float> ypad;
    a.resize(feed_bytes + 64);
    ci.resize(g.M * ldc);
    if (Conversion::kRow) srow.resize(g.M * g.N);
    if (d.P > 1) acc.resize(cout * dom);
    if (padded) ypad.resize(dom);
    float* out = y + b * cout * g.N;
    const PlaneView view{ci.data(), ldc, corr.data(), srow.data(), g.N};
    if (one_plane) {
      products(b, a.data(), ci.data(), nullptr);
      for (int64_t gg = 0; gg < d.G; ++gg)
        for (int64_t o = 0; o < coutg; ++o) {
          const int64_t c = gg * coutg + o;
          conv.rows(view, d, gg, o, coutg, coef, ep, c, ep.addend(b, c, cout, g.N), ep.residual(b, c, cout, g.N),
                    out + c * g.N, g.OH, g.OW, pl.pixel(1, 0, g) - pl.pixel(0, 0, g));
        }
      return;
    }
    for (int64_t p = 0; p < d.P; ++p) {
      products(p * B + b, a.data(), ci.data(), Conversion::kRow ? srow.data() : nullptr);
      const auto state = conv.begin(view);
      const bool first = p == 0, last = p == d.P - 1;
      for (int64_t gg = 0; gg < d.G; ++gg)
        for (int64_t o = 0; o < coutg; ++o) {
          double* ao = d.P > 1 ? acc.data() + (gg * coutg + o) * dom : nullptr;
          float* yo = padded ? ypad.data() : out + (gg * coutg + o) * g.N;
          // one plane, one or two terms summed in float32 where that is the float64 sum
          // (float_sum_exact), and the epilogue, straight into the output channel
          const int64_t terms = d.T * d.S, c = gg * coutg + o;
          const int64_t col0 = term_column(d, gg, o, coutg, 0), col1 = term_column(d, gg, o, coutg, 1);
          const float k0 = coef[0], k1 = terms == 2 ? coef[1 % d.S] : 0.0f;
          if (!padded && d.P == 1 &&
              float_sum_exact(terms, k0, k1, conv.step(col0), terms == 2 ? conv.step(col1) : 0.0f, conv.top_code())) {
            const float* ad = ep.addend(b, c, cout, g.N);
            const float* rd = ep.residual(b, c, cout, g.N);
            for (int64_t n0 = 0; n0 < dom; n0 += kPixBlock) {
              const int64_t len = std::min(kPixBlock, dom - n0);
              float v0[kPixBlock], v1[kPixBlock];
              conv.convert(view, col0, n0, len, state, v0);
              if (terms == 2) {
                conv.convert(view, col1, n0, len, state, v1);
                for (int64_t i = 0; i < len; ++i) v0[i] = ((v0[i] * k0) + (v1[i] * k1)) + 0.0f;
              } else {
                for (int64_t i = 0; i < len; ++i) v0[i] = (v0[i] * k0) + 0.0f;
              }
              ep.apply(yo + n0, v0, ad == nullptr ? nullptr : ad + n0, rd == nullptr ? nullptr : rd + n0, c, len);
            }
            continue;
          }
          // sum = (first plane ? +0.0 : the running sum) + double(v) * k over the (tile, slice)
          // terms; the first term reads the running sum and the last writes it (or, on the last
          // plane, its float32 rounding): no copies in or out of the block's buffer
          for (int64_t n0 = 0; n0 < dom; n0 += kPixBlock) {
            const int64_t len = std::min(kPixBlock, dom - n0);
            double sum[kPixBlock];
            for (int64_t j = 0; j < terms; ++j) {
              const int64_t t = j / d.S, s = j % d.S;
              const double k = static_cast<double>(coef[p * d.S + s]);
              const int64_t col = ((gg * d.T + t) * d.S + s) * coutg + o;
              const double* src = j > 0 ? sum : first ? nullptr : ao + n0;
              if (j + 1 < terms)
                conv.accumulate(view, col, n0, len, state, k, src, sum);
              else if (last)
                conv.accumulate(view, col, n0, len, state, k, src, yo + n0);
              else
                conv.accumulate(view, col, n0, len, state, k, src, ao + n0);
            }
          }
          if (!last) continue;
          const float* ad = ep.addend(b, c, cout, g.N);
          const float* rd = ep.residual(b, c, cout, g.N);
          float* oc = out + c * g.N;
          if (padded)   // the epilogue reads the padded rows and writes the output's
            for (int64_t oh = 0; oh < g.OH; ++oh)
              ep.apply(oc + oh * g.OW, yo + pl.pixel(oh, 0, g), ad == nullptr ? nullptr : ad + oh * g.OW,
                       rd == nullptr ? nullptr : rd + oh * g.OW, c, g.OW);
          else
            ep.apply(oc, oc, ad, rd, c, g.N);
        }
    }
  });
}

// The ideal conversion straight from the int32 products: float(s - corr) is the partial sum
// the Conv would give (exact below 2^24), then adc_ideal's operations.
struct IdealFromProducts {
  static constexpr bool kRow = false;
  static constexpr bool kRows = true;
  ColParam sc, zp;
  float top;
  void prepare(Ort::KernelContext&, const float*) const {}
  uint32_t begin(const PlaneView&) const { return 0u; }
  void convert(const PlaneView& pv, int64_t c, int64_t n0, int64_t len, uint32_t, float* v) const {
    const int32_t* in = pv.ci + c * pv.ldc + n0;
    const int32_t cr = pv.corr[c];
    const float d = sc.at(c), z = zp.at(c);
    const RoundDiv rd(d);
    for (int64_t i = 0; i < len; ++i) {
      const float s = static_cast<float>(in[i] - cr);
      const float code = std::min(std::max(rd(s) + z, 0.0f), top);
      v[i] = (code - z) * d;
    }
  }
#if defined(__AVX512F__)
  // convert's steps on sixteen products raw of a column with correction cr, step rd.d, zero point z
  // (std::max(a, b) is _mm512_max_ps(b, a), std::min(a, b) _mm512_min_ps(b, a): the same operand
  // on ties and NaN)
  __m512 conv16(__m512i raw, int32_t cr, const RoundDiv& rd, float z) const {
    const __m512 sv = _mm512_cvtepi32_ps(_mm512_sub_epi32(raw, _mm512_set1_epi32(cr)));
    const __m512 vz = _mm512_set1_ps(z);
    const __m512 code =
        _mm512_min_ps(_mm512_set1_ps(top), _mm512_max_ps(_mm512_setzero_ps(), _mm512_add_ps(rd.r16(sv), vz)));
    return _mm512_mul_ps(_mm512_sub_ps(code, vz), _mm512_set1_ps(rd.d));
  }
#endif
  // dst[i] = (src ? src[i] : +0.0) + double(v[i]) * k for i < len, v column c's conversions
  // (convert's steps), as AddTerm does, in one pass (AVX-512: masked for the last < 16)
  template <typename T>
  void accumulate(const PlaneView& pv, int64_t c, int64_t n0, int64_t len, uint32_t state, double k,
                  const double* src, T* dst) const {
#if defined(__AVX512F__)
    (void)state;
    const int32_t* in = pv.ci + c * pv.ldc + n0;
    const RoundDiv rd(sc.at(c));
    const float z = zp.at(c);
    const int32_t cr = pv.corr[c];
    const AddTerm<T> out{src, dst, k};
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1u);
      out.put16m(i, conv16(_mm512_maskz_loadu_epi32(m, in + i), cr, rd, z), m);
    }
#else
    float v[kPixBlock];
    convert(pv, c, n0, len, state, v);
    const AddTerm<T> out{src, dst, k};
    for (int64_t i = 0; i < len; ++i) out.put(i, v[i]);
#endif
  }
  float step(int64_t c) const { return sc.at(c); }
  float top_code() const { return top; }
  // Output channel c = (gg, o) of a one-plane chunk, row by row: its T*S columns ((gg*T + t)*S
  // + s)*coutg + o converted (the steps of convert) and summed in float64 in AdcRecombine's
  // order (sum = +0.0; sum += double(v) * k), rounded to float32, then the epilogue ((addend +
  // r) * scale) + bias, stored at out[oh * OW ..] (products of row oh at pv.ci + col * ldc + oh *
  // row); one or two terms in float32 where float_sum_exact says that is the same value.
  // In AVX-512 std::max(a, b) is _mm512_max_ps(b, a), std::min(a, b) _mm512_min_ps(b, a): the
  // same operand on ties and NaN.
  void rows(const PlaneView& pv, const RecombineDims& d, int64_t gg, int64_t o, int64_t coutg, const float* coef,
            const Epilogue& ep, int64_t c, const float* ad, const float* rd, float* out, int64_t OH, int64_t OW,
            int64_t row) const {
    const int64_t terms = d.T * d.S;
    thread_local std::vector<int64_t> col;
    thread_local std::vector<float> dd, zz, kk;
    thread_local std::vector<int32_t> cr;
    thread_local std::vector<RoundDiv> rdv;
    col.resize(terms); dd.resize(terms); zz.resize(terms); kk.resize(terms); cr.resize(terms);
    rdv.clear();
    for (int64_t i = 0; i < terms; ++i) {
      const int64_t cc = term_column(d, gg, o, coutg, i);
      col[i] = cc; dd[i] = sc.at(cc); zz[i] = zp.at(cc); kk[i] = coef[i % d.S]; cr[i] = pv.corr[cc];
      rdv.emplace_back(dd[i]);
    }
    // plain pointers: thread_local objects of a shared library are reached through a call
    const int64_t* COL = col.data();
    const float *D = dd.data(), *Z = zz.data(), *K = kk.data();
    const int32_t* CR = cr.data();
    const RoundDiv* RD = rdv.data();
    // one or two terms summed in float32 where that is the float64 sum (float_sum_exact)
    const bool fsum = float_sum_exact(terms, K[0], terms == 2 ? K[1] : 0.0f, D[0], terms == 2 ? D[1] : 0.0f, top);
    const bool one = fsum && terms == 1, two = fsum && terms == 2;
    const float sc_c = ep.scale(c), bi_c = ep.bias(c), a0 = ep.add[0], q0 = ep.res[0];
    int64_t oh = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(sc_c), vt = _mm512_set1_ps(bi_c), va0 = _mm512_set1_ps(a0),
                 vq0 = _mm512_set1_ps(q0), zero = _mm512_setzero_ps();
    // The values at output offset f = oh * OW + ow, sixteen (mask m) at a time: of one row, or of
    // two rows where OW <= 8 (row oh's OW values, then row oh + 1's: contiguous in the output,
    // apart by `row` in the products)
    auto block = [&](int64_t f, __mmask16 m, bool pair, int64_t p0) {
      auto term = [&](int64_t i) {
        const int32_t* in = pv.ci + COL[i] * pv.ldc + p0;
        __m512i raw = _mm512_maskz_loadu_epi32(pair ? __mmask16((1u << OW) - 1u) : m, in);
        if (pair) raw = _mm512_mask_expandloadu_epi32(raw, __mmask16(m & ~((1u << OW) - 1u)), in + row);
        return conv16(raw, CR[i], RD[i], Z[i]);
      };
      __m512 y;
      if (one) {
        y = _mm512_add_ps(_mm512_mul_ps(term(0), _mm512_set1_ps(K[0])), zero);
      } else if (two) {
        y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(term(0), _mm512_set1_ps(K[0])),
                                        _mm512_mul_ps(term(1), _mm512_set1_ps(K[1]))), zero);
      } else {
        __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
        for (int64_t i = 0; i < terms; ++i) {
          const __m512 v = term(i);
          const __m512d k = _mm512_set1_pd(static_cast<double>(K[i]));
          lo = _mm512_add_pd(lo, _mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), k));
          hi = _mm512_add_pd(hi, _mm512_mul_pd(
              _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))), k));
        }
        y = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo))),
                                                _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1));
      }
      const __m512 av = ad == nullptr ? va0 : _mm512_maskz_loadu_ps(m, ad + f);
      const __m512 qv = rd == nullptr ? vq0 : _mm512_maskz_loadu_ps(m, rd + f);
      __m512 u = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_add_ps(av, y), vs), vt), qv);
      if (ep.relu) u = _mm512_max_ps(zero, u);   // u < 0 ? 0 : u (-0.0 and NaN stay: the second operand)
      _mm512_mask_storeu_ps(out + f, m, u);
    };
    if (OW <= 8)
      for (; oh + 2 <= OH; oh += 2) block(oh * OW, __mmask16((1u << (2 * OW)) - 1u), true, oh * row);
    for (; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ow += 16)
        block(oh * OW + ow, OW - ow >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (OW - ow)) - 1u), false,
              oh * row + ow);
#endif
    for (; oh < OH; ++oh) {
      float* op = out + oh * OW;
      const float* a = ad == nullptr ? nullptr : ad + oh * OW;
      const float* q = rd == nullptr ? nullptr : rd + oh * OW;
      for (int64_t ow = 0; ow < OW; ++ow) {
        double sum = 0.0;
        for (int64_t i = 0; i < terms; ++i) {
          const float sv = static_cast<float>(pv.ci[COL[i] * pv.ldc + oh * row + ow] - CR[i]);
          const float code = std::min(std::max(RD[i](sv) + Z[i], 0.0f), top);
          sum += static_cast<double>((code - Z[i]) * D[i]) * static_cast<double>(K[i]);
        }
        op[ow] = ep.post((((a == nullptr ? a0 : a[ow]) + static_cast<float>(sum)) * sc_c) + bi_c,
                         q == nullptr ? q0 : q[ow]);
      }
    }
  }
};

struct NonIdealFromRow {
  static constexpr bool kRow = true;
  static constexpr bool kRows = false;
  NonIdeal& ni;
  // a curve is tabulated per column where the first image's first plane says it pays
  void prepare(Ort::KernelContext& ctx, const float* row) const {
    if (!ni.identity && ni.table_pays({row})) ni.tabulate(ctx);
  }
  uint32_t begin(const PlaneView& pv) const { return ni.noisy ? ni.row_key(pv.row) : 0u; }
  float step(int64_t c) const { return ni.sc.at(c); }
  float top_code() const { return ni.top; }
  void convert(const PlaneView& pv, int64_t c, int64_t n0, int64_t len, uint32_t key, float* v) const {
    ni.run_range(pv.row, c, n0, len, key, Store{v});
  }
  template <typename T>
  void accumulate(const PlaneView& pv, int64_t c, int64_t n0, int64_t len, uint32_t key, double k, const double* src,
                  T* dst) const {
    ni.run_range(pv.row, c, n0, len, key, AddTerm<T>{src, dst, k});
  }
  void rows(const PlaneView&, const RecombineDims&, int64_t, int64_t, int64_t, const float*, const Epilogue&, int64_t,
            const float*, const float*, float*, int64_t, int64_t, int64_t) const {}
};

struct ConvAdcRecombineKernel {
  static constexpr int kInt64Input = 1;  // channels
  ConvAttrs attrs;
  int64_t bits;
  RecombineDims d;
  ConvAdcRecombineKernel(const OrtApi&, const OrtKernelInfo* info)
      : attrs(info), bits(Ort::ConstKernelInfo(info).GetAttribute<int64_t>("bits")), d(recombine_dims(info)) {}
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const char* op = "ConvAdcRecombine";
    const int64_t cols = ctx.GetInput(2).GetTensorTypeAndShapeInfo().GetShape()[0];
    const IdealFromProducts conv{col_param(ctx, 3, cols, op, "scale"), col_param(ctx, 4, cols, op, "zero_point"),
                                 std::pow(2.0f, static_cast<float>(bits)) - 1.0f};
    conv_adc_recombine(ctx, attrs, d, 5, op, conv);
  }
};

struct ConvAdcRecombineNonIdealKernel : NonIdealAttrs {
  static constexpr int kInt64Input = 1;  // channels
  ConvAttrs attrs;
  RecombineDims d;
  ConvAdcRecombineNonIdealKernel(const OrtApi&, const OrtKernelInfo* info)
      : NonIdealAttrs(info), attrs(info), d(recombine_dims(info)) {}
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const char* op = "ConvAdcRecombineNonIdeal";
    const auto xs = ctx.GetInput(0).GetTensorTypeAndShapeInfo().GetShape();
    const ChannelMap cm(ctx, xs, op);
    const ConvGeom g = conv_geom(cm.conv_shape, ctx.GetInput(2).GetTensorTypeAndShapeInfo().GetShape(), attrs, op);
    NonIdeal ni(ctx, op, bits, seed, sigma, 3, {xs[0], g.M, g.OH, g.OW}, nullptr);
    conv_adc_recombine(ctx, attrs, d, 8, op, NonIdealFromRow{ni});
  }
};

template <typename Kernel, int NIn>
struct Op : Ort::CustomOpBase<Op<Kernel, NIn>, Kernel> {
  const char* name;
  explicit Op(const char* n) : name(n) {}
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Kernel(api, info); }
  const char* GetName() const { return name; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return NIn; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return Kernel::kInt64Input == static_cast<int>(i) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                                      : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static Op<QuantizeInputKernel, 2> quantize_input("QuantizeInput");
  static Op<BitPlanesKernel, 1> bit_planes("BitPlanes");
  static Op<AdcKernel, 3> adc("AdcQuantize");
  static Op<AdcNonIdealKernel, 6> adc_nonideal("AdcQuantizeNonIdeal");
  static Op<RecombineKernel, 2> recombine("Recombine");
  static Op<AdcRecombineKernel, 4> adc_recombine("AdcRecombine");
  static Op<AdcRecombineNonIdealKernel, 7> adc_recombine_nonideal("AdcRecombineNonIdeal");
  static Op<ConvAdcRecombineKernel, 11> conv_adc_recombine("ConvAdcRecombine");
  static Op<ConvAdcRecombineNonIdealKernel, 14> conv_adc_recombine_nonideal("ConvAdcRecombineNonIdeal");
  static Ort::CustomOpDomain domain{"ai.pimc"};
  static std::once_flag once;
  OrtStatus* status = nullptr;
  try {
    std::call_once(once, [] {
      domain.Add(&quantize_input);
      domain.Add(&bit_planes);
      domain.Add(&adc);
      domain.Add(&adc_nonideal);
      domain.Add(&recombine);
      domain.Add(&adc_recombine);
      domain.Add(&adc_recombine_nonideal);
      domain.Add(&conv_adc_recombine);
      domain.Add(&conv_adc_recombine_nonideal);
    });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    status = Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return status;
}

extern "C" const char* PimcNativeVersion() { return "pimc-native 3"; }

// The integer products the fused array ops use: "vnni" (AVX-512 VNNI bytes), "+popcount"
// (AND + popcount for bit planes times 1-bit cells), or "portable".
extern "C" const char* PimcNativeIsa() {
  return kVnni ? (kPopcount ? "vnni+popcount" : "vnni") : (kPopcount ? "popcount" : "portable");
}
