// CPU kernels of the sema op contract: EMA update (+ switch), switch, swap, on flat buffers.
//
// This file is compiled twice by setup.py: once for the x86-64 baseline (namespace
// sema::cpu_baseline) and, on x86-64, once with -mavx2 -mfma -mf16c (namespace
// sema::cpu_avx2, SEMA_CPU_FMA=1). bindings.cpp picks one at run time from the CPU's features,
// so the wheel runs on any x86-64 CPU and uses 256-bit vectors where they exist.
//
// The lerp follows PyTorch's CPU kernel bit for bit: its AVX2/AVX-512 vector path computes
// fma(coeff, p - e, base) with (coeff, base) = (w, e) if w < 0.5 else (w - 1, p); its baseline
// ("DEFAULT" capability) path computes base + coeff * (p - e) with two roundings. The AVX2 object
// uses the first formula, the baseline object the second (built with -ffp-contract=off).
//
// Nothing here may have external linkage except the three entry points: the two objects are
// linked into one library, and an inline function emitted by both (a std:: template, say)
// would be merged by the linker, letting AVX2 code leak into the baseline path. Hence an
// anonymous namespace and builtins instead of <cmath>/<algorithm>.

#include <cstddef>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef SEMA_CPU_NAMESPACE
#error "setup.py defines SEMA_CPU_NAMESPACE (cpu_baseline or cpu_avx2)"
#endif
#ifndef SEMA_CPU_FMA
#define SEMA_CPU_FMA 0
#endif

namespace sema {
namespace SEMA_CPU_NAMESPACE {

// dtype codes, shared with bindings.cpp and sema/_extension.py
constexpr int kFloat32 = 0;
constexpr int kBFloat16 = 1;
constexpr int kFloat16 = 2;

namespace {

// Below this many elements per thread, starting a parallel region costs more than it saves.
constexpr int64_t kGrainElements = 1 << 15;
// Thread ranges start on multiples of this (64 bytes of fp32): no cache line is written by two threads.
constexpr int64_t kRangeAlignElements = 16;

inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// Storage types: fp32 as float, bf16 and fp16 as their 16 raw bits. load() widens to fp32
// exactly; store() rounds fp32 to the storage type to nearest even, as torch's .to() does.
struct Float32 {
  using Storage = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

struct BFloat16 {
  using Storage = uint16_t;
  static float load(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // nearest even; Inf stays Inf
    const uint32_t quiet_nan = (u >> 16) | 0x0040u;  // a NaN keeps its sign and stays a NaN
    const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return static_cast<uint16_t>(is_nan ? quiet_nan : rounded);
  }
};

// fp16 <-> fp32 without F16C, branch-free so that the loops vectorise (the method of
// Maratyszcza's FP16 library, which c10::Half also uses). Exact for every input, subnormals
// included; NaN -> sign | 0x7E00.
struct Float16 {
  using Storage = uint16_t;
  static float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
    return bits_to_float(sign | magnitude);
  }
  static uint16_t store(float f) {
    const float magnitude = bits_to_float(float_to_bits(f) & 0x7FFFFFFFu);
    float base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;  // overflow goes to Inf here
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;  // the add rounds to nearest even
    const uint32_t bits = float_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

template <bool SMALL_WEIGHT>
inline float lerp(float e, float p, float coeff) {
  const float base = SMALL_WEIGHT ? e : p;
#if SEMA_CPU_FMA
  return __builtin_fmaf(coeff, p - e, base);
#else
  return base + coeff * (p - e);
#endif
}

// Runs body(begin, end) over [0, n) split into one contiguous range per thread.
template <typename Body>
void parallel_ranges(int64_t n, int num_threads, const Body& body) {
  int64_t threads = (n + kGrainElements - 1) / kGrainElements;
  if (threads > num_threads) threads = num_threads;
#ifdef _OPENMP
  if (threads > 1) {
    const int64_t per_thread =
        ((n + threads - 1) / threads + kRangeAlignElements - 1) / kRangeAlignElements * kRangeAlignElements;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static, 1)
    for (int64_t t = 0; t < threads; ++t) {
      const int64_t begin = t * per_thread;
      const int64_t end = begin + per_thread < n ? begin + per_thread : n;
      if (begin < end) body(begin, end);
    }
    return;
  }
#endif
  if (n > 0) body(0, n);
}

// ema <- lerp(ema, param, w); with SWITCH, param <- cast(ema). 10 / 12 bytes per element
// for fp32 ema and bf16 params.
template <typename E, typename P, bool SWITCH, bool SMALL_WEIGHT>
void update_range(typename E::Storage* __restrict ema, typename P::Storage* __restrict param, int64_t begin,
                  int64_t end, float coeff) {
  for (int64_t i = begin; i < end; ++i) {
    const float result = lerp<SMALL_WEIGHT>(E::load(ema[i]), P::load(param[i]), coeff);
    const typename E::Storage stored = E::store(result);
    ema[i] = stored;
    if constexpr (SWITCH) {
      if constexpr (__is_same(E, P)) {
        param[i] = stored;
      } else {
        param[i] = P::store(result);
      }
    }
  }
}

template <typename E, typename P>
void update_typed(void* ema_ptr, void* param_ptr, int64_t n, float w, bool switch_param, int num_threads) {
  auto* ema = static_cast<typename E::Storage*>(ema_ptr);
  auto* param = static_cast<typename P::Storage*>(param_ptr);
  const bool small_weight = w < 0.5f;
  const float coeff = small_weight ? w : w - 1.0f;  // w - 1 is exact for w in [0.5, 1]
  parallel_ranges(n, num_threads, [&](int64_t begin, int64_t end) {
    if (switch_param) {
      if (small_weight) {
        update_range<E, P, true, true>(ema, param, begin, end, coeff);
      } else {
        update_range<E, P, true, false>(ema, param, begin, end, coeff);
      }
    } else {
      if (small_weight) {
        update_range<E, P, false, true>(ema, param, begin, end, coeff);
      } else {
        update_range<E, P, false, false>(ema, param, begin, end, coeff);
      }
    }
  });
}

// param <- cast(ema): 6 bytes per element for fp32 ema and bf16 params.
template <typename E, typename P>
void switch_typed(const void* ema_ptr, void* param_ptr, int64_t n, int num_threads) {
  const auto* ema = static_cast<const typename E::Storage*>(ema_ptr);
  auto* param = static_cast<typename P::Storage*>(param_ptr);
  parallel_ranges(n, num_threads, [&](int64_t begin, int64_t end) {
    if constexpr (__is_same(E, P)) {
      // a plain copy: libc's memcpy writes large blocks with non-temporal stores, skipping the
      // read-for-ownership of the destination that a store loop pays
      __builtin_memcpy(param + begin, ema + begin, static_cast<size_t>(end - begin) * sizeof(*ema));
    } else {
      for (int64_t i = begin; i < end; ++i) param[i] = P::store(E::load(ema[i]));
    }
  });
}

// Equal dtypes: exchange the raw bits (its own inverse; NaN payloads survive).
template <typename Word>
void exchange_bits(void* ema_ptr, void* param_ptr, int64_t n, int num_threads) {
  auto* ema = static_cast<Word*>(ema_ptr);
  auto* param = static_cast<Word*>(param_ptr);
  parallel_ranges(n, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Word saved = ema[i];
      ema[i] = param[i];
      param[i] = saved;
    }
  });
}

// fp32 EMA E with bf16 param P, no extra memory (DESIGN.md):
//   pack:    param <- hi16(E) + carry, ema <- (P << 16) | lo16(E), carry = lo16(E) >= 0x8000
//   restore: param <- hi16(ema), ema <- ((param - carry) << 16) | lo16(ema)
// 16-bit arithmetic wraps, so restore undoes pack bit for bit for every input.
template <bool RESTORE>
void pack_bf16(void* ema_ptr, void* param_ptr, int64_t n, int num_threads) {
  auto* ema = static_cast<uint32_t*>(ema_ptr);
  auto* param = static_cast<uint16_t*>(param_ptr);
  parallel_ranges(n, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t e = ema[i];
      const uint32_t p = param[i];
      const uint32_t low = e & 0xFFFFu;
      const uint32_t carry = low >> 15;
      if constexpr (RESTORE) {
        param[i] = static_cast<uint16_t>(e >> 16);
        ema[i] = (((p - carry) & 0xFFFFu) << 16) | low;
      } else {
        param[i] = static_cast<uint16_t>((e >> 16) + carry);
        ema[i] = (p << 16) | low;
      }
    }
  });
}

}  // namespace

// Entry points. bindings.cpp validated the pointers, lengths and dtype codes.

void ema_update(void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, float w, bool switch_param,
                int num_threads) {
  if (ema_dtype == kFloat32) {
    if (param_dtype == kFloat32) update_typed<Float32, Float32>(ema, param, n, w, switch_param, num_threads);
    if (param_dtype == kBFloat16) update_typed<Float32, BFloat16>(ema, param, n, w, switch_param, num_threads);
    if (param_dtype == kFloat16) update_typed<Float32, Float16>(ema, param, n, w, switch_param, num_threads);
  } else if (ema_dtype == kBFloat16 && param_dtype == kBFloat16) {
    update_typed<BFloat16, BFloat16>(ema, param, n, w, switch_param, num_threads);
  } else if (ema_dtype == kFloat16 && param_dtype == kFloat16) {
    update_typed<Float16, Float16>(ema, param, n, w, switch_param, num_threads);
  }
}

void switch_param(const void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, int num_threads) {
  if (ema_dtype == param_dtype) {
    if (ema_dtype == kFloat32) switch_typed<Float32, Float32>(ema, param, n, num_threads);
    if (ema_dtype != kFloat32) switch_typed<BFloat16, BFloat16>(ema, param, n, num_threads);  // a 16-bit copy
  } else if (ema_dtype == kFloat32) {
    if (param_dtype == kBFloat16) switch_typed<Float32, BFloat16>(ema, param, n, num_threads);
    if (param_dtype == kFloat16) switch_typed<Float32, Float16>(ema, param, n, num_threads);
  }
}

void swap(void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, bool restore, int num_threads) {
  if (ema_dtype == param_dtype) {
    if (ema_dtype == kFloat32) exchange_bits<uint32_t>(ema, param, n, num_threads);
    if (ema_dtype != kFloat32) exchange_bits<uint16_t>(ema, param, n, num_threads);
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16) {
    if (restore) pack_bf16<true>(ema, param, n, num_threads);
    if (!restore) pack_bf16<false>(ema, param, n, num_threads);
  }
}

}  // namespace SEMA_CPU_NAMESPACE
}  // namespace sema
