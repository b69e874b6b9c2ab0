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
// Nothing here may have external linkage except the four entry points: the two objects are
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

#if SEMA_CPU_FMA
// Intrinsics only (always inlined, never emitted out of line): safe under the rule above.
#include <immintrin.h>
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
#if SEMA_CPU_FMA
  static __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
  static void store8(float* x, __m256 f) { _mm256_storeu_ps(x, f); }
#endif
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
#if SEMA_CPU_FMA
  static __m256 load8(const uint16_t* h) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  // store() on 8 lanes
  static __m128i pack8(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x0040));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    const __m256i bits = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);  // each lane in [0, 0xFFFF]
    // packus works within 128-bit halves: [0..3, 0..3 | 4..7, 4..7] -> take 64-bit blocks 0 and 2
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xD8));
  }
  static void store8(uint16_t* h, __m256 f) { _mm_storeu_si128(reinterpret_cast<__m128i*>(h), pack8(f)); }
  static void stream8(uint16_t* h, __m256 f) { _mm_stream_si128(reinterpret_cast<__m128i*>(h), pack8(f)); }
#endif
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
#if SEMA_CPU_FMA
  // F16C, 8 lanes: ~1 instruction per direction where the portable form above takes ~20.
  // Same results, except that a NaN keeps its top payload bits here (still a NaN).
  static __m256 load8(const uint16_t* h) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  }
  static __m128i pack8(__m256 f) { return _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store8(uint16_t* h, __m256 f) { _mm_storeu_si128(reinterpret_cast<__m128i*>(h), pack8(f)); }
  static void stream8(uint16_t* h, __m256 f) { _mm_stream_si128(reinterpret_cast<__m128i*>(h), pack8(f)); }
#endif
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

// Runs body(begin, end) over [0, n) split into one contiguous range per thread, of at least
// `grain` elements each.
template <typename Body>
void parallel_ranges(int64_t n, int num_threads, const Body& body, int64_t grain = kGrainElements) {
  int64_t threads = (n + grain - 1) / grain;
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
//
// gcc vectorises the loop below for every type, but its fp16 conversion (~20 instructions a
// lane without F16C) makes that loop compute-bound and its bf16 packing is clumsy, so the AVX2
// object runs the 16-bit types through load8/store8 (F16C for fp16), 8 lanes at a time, and
// leaves the tail to the scalar loop.
template <typename T>
constexpr bool kVector8 = SEMA_CPU_FMA && (__is_same(T, Float16) || __is_same(T, BFloat16));

template <typename E, typename P, bool SWITCH, bool SMALL_WEIGHT>
void update_range(typename E::Storage* __restrict ema, typename P::Storage* __restrict param, int64_t begin,
                  int64_t end, float coeff) {
  int64_t i = begin;
#if SEMA_CPU_FMA
  if constexpr (kVector8<E> || kVector8<P>) {
    const __m256 vcoeff = _mm256_set1_ps(coeff);
    for (; i + 8 <= end; i += 8) {
      const __m256 e = E::load8(ema + i);
      const __m256 p = P::load8(param + i);
      const __m256 result = _mm256_fmadd_ps(vcoeff, _mm256_sub_ps(p, e), SMALL_WEIGHT ? e : p);
      E::store8(ema + i, result);
      if constexpr (SWITCH) P::store8(param + i, result);
    }
  }
#endif
  for (; i < end; ++i) {
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

// K EMAs of one param, each updated exactly as update_typed() would with w = ws[k]. A thread
// walks its range in blocks small enough that the param block stays in L1 while the K EMAs
// stream through it: the param comes from memory once, 4 + 8K bytes per element for fp32
// (2 + 8K for bf16 params with fp32 EMAs). The EMA at switch_index is updated last in each
// block and writes the param, after every other EMA has read it.
constexpr int64_t kParamBlockElements = 2048;  // 8 KB of fp32 params; a multiple of 16

template <typename E, typename P, bool SWITCH>
void update_block(typename E::Storage* ema, typename P::Storage* param, int64_t begin, int64_t end, float w) {
  if (w < 0.5f) {
    update_range<E, P, SWITCH, true>(ema, param, begin, end, w);
  } else {
    update_range<E, P, SWITCH, false>(ema, param, begin, end, w - 1.0f);  // w - 1 is exact for w in [0.5, 1]
  }
}

template <typename E, typename P>
void update_k_typed(void* const* ema_ptrs, int num_emas, void* param_ptr, int64_t n, const float* ws,
                    int switch_index, int num_threads) {
  auto* param = static_cast<typename P::Storage*>(param_ptr);
  const auto ema = [&](int k) { return static_cast<typename E::Storage*>(ema_ptrs[k]); };
  const int64_t per_ema = kGrainElements / num_emas;  // about the single op's bytes per thread
  const int64_t grain = per_ema > kParamBlockElements ? per_ema : kParamBlockElements;
  parallel_ranges(
      n, num_threads,
      [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; block += kParamBlockElements) {
          const int64_t block_end = block + kParamBlockElements < end ? block + kParamBlockElements : end;
          for (int k = 0; k < num_emas; ++k) {
            if (k != switch_index) update_block<E, P, false>(ema(k), param, block, block_end, ws[k]);
          }
          if (switch_index >= 0) {
            update_block<E, P, true>(ema(switch_index), param, block, block_end, ws[switch_index]);
          }
        }
      },
      grain);
}

// param <- cast(ema): 6 bytes per element for fp32 ema and bf16 params.
//
// param is only written here, so a store loop would first read every destination line into the
// cache (read-for-ownership) and later write it back: 1.5x the bytes of the op. Non-temporal
// stores skip that read. glibc's memcpy would do the same above its own threshold, but derives
// that threshold from the L3 size the CPU reports, which VMs inflate (256 MB here), so the AVX2
// object streams itself for destinations of kStreamMinBytes and more. Below that the params
// may still be in cache for the next forward pass: ordinary stores.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

template <typename E, typename P>
void switch_typed(const void* ema_ptr, void* param_ptr, int64_t n, int num_threads) {
  const auto* ema = static_cast<const typename E::Storage*>(ema_ptr);
  auto* param = static_cast<typename P::Storage*>(param_ptr);
#if SEMA_CPU_FMA
  const bool stream = n * static_cast<int64_t>(sizeof(*param)) >= kStreamMinBytes;
#endif
  parallel_ranges(n, num_threads, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#if SEMA_CPU_FMA
    if (stream) {
      for (; i < end && reinterpret_cast<uintptr_t>(param + i) % 16 != 0; ++i) {
        if constexpr (__is_same(E, P)) {
          param[i] = ema[i];  // raw bits: a NaN's payload survives (a 16-bit copy may be fp16 data)
        } else {
          param[i] = P::store(E::load(ema[i]));
        }
      }
      if constexpr (__is_same(E, P)) {
        constexpr int64_t kLanes = 16 / sizeof(*param);
        for (; i + kLanes <= end; i += kLanes) {
          const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ema + i));
          _mm_stream_si128(reinterpret_cast<__m128i*>(param + i), bits);
        }
      } else {
        for (; i + 8 <= end; i += 8) P::stream8(param + i, E::load8(ema + i));
      }
      _mm_sfence();  // streamed stores are weakly ordered: complete them before the threads join
    } else if constexpr (!__is_same(E, P) && kVector8<P>) {
      for (; i + 8 <= end; i += 8) P::store8(param + i, E::load8(ema + i));
    }
#endif
    if constexpr (__is_same(E, P)) {
      __builtin_memcpy(param + i, ema + i, static_cast<size_t>(end - i) * sizeof(*ema));
    } else {
      for (; i < end; ++i) param[i] = P::store(E::load(ema[i]));
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

void ema_update_k(void* const* emas, int num_emas, void* param, int64_t n, int ema_dtype, int param_dtype,
                  const float* ws, int switch_index, int num_threads) {
  const int s = switch_index;
  if (ema_dtype == kFloat32) {
    if (param_dtype == kFloat32) update_k_typed<Float32, Float32>(emas, num_emas, param, n, ws, s, num_threads);
    if (param_dtype == kBFloat16) update_k_typed<Float32, BFloat16>(emas, num_emas, param, n, ws, s, num_threads);
    if (param_dtype == kFloat16) update_k_typed<Float32, Float16>(emas, num_emas, param, n, ws, s, num_threads);
  } else if (ema_dtype == kBFloat16 && param_dtype == kBFloat16) {
    update_k_typed<BFloat16, BFloat16>(emas, num_emas, param, n, ws, s, num_threads);
  } else if (ema_dtype == kFloat16 && param_dtype == kFloat16) {
    update_k_typed<Float16, Float16>(emas, num_emas, param, n, ws, s, num_threads);
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
