// CUDA kernels of the sema op contract: EMA update (+ switch), switch, swap, and the update of K
// EMAs of one param in one pass, on flat buffers or on a device table of pieces of many buffers
// (the multi-tensor update, FSDP2 shards).
//
// One kernel body, the op a template flag. The host cuts the work into one contiguous piece
// per block, as many blocks as stay resident on the device (SMs x the occupancy API's blocks
// per SM) and pieces of equal size, so there is no second, partly filled wave. Inside its
// piece a block walks tiles of kThreads x kUnroll 16-byte vectors (the narrower dtype's width
// sets the element count; the wider one takes two 16-byte accesses): each thread issues all
// the loads of its kUnroll vectors before the first dependent store, which keeps 64-128 bytes
// per thread in flight (a memory-bound kernel on an H200 needs about 26-33 KB per SM). A
// masked tile ends the piece; a scalar loop takes a tensor's last elements and whole pieces
// whose pointers are not 16-byte aligned. Every offset is int64: buffers past 2**31 elements
// are real. The multi-tensor kernel reads its piece (pointers and length) with one load from
// a table the host built once per set of tensors (sema/_ext_cuda.py caches it on the device).
//
// The lerp is fma(coeff, p - e, base), (coeff, base) = (w, e) if w < 0.5 else (w - 1, p):
// the value PyTorch's CUDA lerp gives once nvcc contracts its two-branch formula. w comes
// either as a value or as a pointer to one fp32 on the device (no host sync, graph capturable).
//
// The kernel body is __host__ __device__ and takes its block and thread indices as arguments,
// so that a test build (-DSEMA_CUDA_HOST_EMULATION, tests/test_cuda_emulated.py) runs these
// very kernels, grids, piece tables and dtype dispatch on the CPU, one (block, thread) at a
// time: each element belongs to exactly one thread and no thread reads another's, so running
// the threads in turn gives what the GPU gives (casts in the CUDA headers' host implementations).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define SEMA_STRINGIFY_ARGS(...) #__VA_ARGS__
#define SEMA_STRINGIFY(...) SEMA_STRINGIFY_ARGS(__VA_ARGS__)

namespace sema {
namespace cuda {

// dtype codes, shared with bindings.cpp and sema/_extension.py
constexpr int kFloat32 = 0;
constexpr int kBFloat16 = 1;
constexpr int kFloat16 = 2;

namespace {

#define SEMA_HD __host__ __device__ __forceinline__

SEMA_HD float bits_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

constexpr int kThreads = 256;
// At most 48 registers per thread (65536 / (5 * 256) = 51, in steps of 8): at least 1280
// resident threads per SM, each with 64-96 bytes of loads in flight (80-120 KB per SM).
constexpr int kMinBlocksPerSm = 5;

// One block's share of the multi-tensor update: `n` elements from these addresses. Three
// 8-byte words, read with independent loads (one dependent step before the data).
struct Piece {
  uintptr_t ema;
  uintptr_t param;
  int64_t n;
};

SEMA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class Op { kUpdate, kUpdateSwitch, kSwitch, kExchange, kPack, kUnpack };

// Element types: load() widens to fp32 exactly, store() rounds to nearest even.
struct Float32 {
  using Storage = float;
  SEMA_HD static float load(float x) { return x; }
  SEMA_HD static float store(float x) { return x; }
};

struct BFloat16 {
  using Storage = uint16_t;
  SEMA_HD static float load(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }
  SEMA_HD static uint16_t store(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

struct Float16 {
  using Storage = uint16_t;
  SEMA_HD static float load(uint16_t h) { return __half2float(__ushort_as_half(h)); }
  SEMA_HD static uint16_t store(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// Raw words for the swaps, which move bits and never convert.
struct Word32 {
  using Storage = uint32_t;
};
struct Word16 {
  using Storage = uint16_t;
};

template <typename T, int N>
struct alignas(16) Vector {
  T v[N];
};

template <typename E, typename P, Op OP>
SEMA_HD void apply(typename E::Storage& e, typename P::Storage& p, float coeff, bool small_weight) {
  if constexpr (OP == Op::kUpdate || OP == Op::kUpdateSwitch) {
    const float ev = E::load(e);
    const float pv = P::load(p);
    const float result = fmaf(coeff, pv - ev, small_weight ? ev : pv);
    e = E::store(result);
    if constexpr (OP == Op::kUpdateSwitch) {
      if constexpr (std::is_same_v<E, P>) {
        p = e;
      } else {
        p = P::store(result);
      }
    }
  } else if constexpr (OP == Op::kSwitch) {
    if constexpr (std::is_same_v<E, P>) {
      p = e;
    } else {
      p = P::store(E::load(e));
    }
  } else if constexpr (OP == Op::kExchange) {
    const typename E::Storage saved = e;
    e = p;
    p = saved;
  } else {
    // fp32 EMA word e, bf16 param word p (DESIGN.md): carry = lo16(e) >= 0x8000;
    // pack: p <- hi16(e) + carry, e <- (p << 16) | lo16(e); unpack inverts it mod 2**16.
    const uint32_t word = e;
    const uint32_t low = word & 0xFFFFu;
    const uint32_t carry = low >> 15;
    const uint32_t param_bits = p;
    if constexpr (OP == Op::kPack) {
      p = static_cast<uint16_t>((word >> 16) + carry);
      e = (param_bits << 16) | low;
    } else {
      p = static_cast<uint16_t>(word >> 16);
      e = (((param_bits - carry) & 0xFFFFu) << 16) | low;
    }
  }
}

// Compile-time facts of one (EMA type, param type, op) kernel.
template <typename E, typename P, Op OP>
struct Traits {
  using EStorage = typename E::Storage;
  using PStorage = typename P::Storage;
  // elements per 16 bytes of the narrower dtype (8 for fp32 ema with bf16 params: 32 + 16 bytes)
  static constexpr int V = 16 / (sizeof(EStorage) < sizeof(PStorage) ? sizeof(EStorage) : sizeof(PStorage));
  using EVector = Vector<EStorage, V>;
  using PVector = Vector<PStorage, V>;
  static constexpr bool kReadsParam = OP != Op::kSwitch;
  static constexpr bool kWritesEma = OP != Op::kSwitch;
  static constexpr bool kWritesParam = OP != Op::kUpdate;
  // 16-byte loads per vector step: 1 (same-dtype switch) to 3 (fp32 EMA with 16-bit params)
  static constexpr int kLoads = static_cast<int>((sizeof(EVector) + (kReadsParam ? sizeof(PVector) : 0)) / 16);
  // vectors per thread per tile: 4 loads of 16 bytes at least, 16-24 registers of data
  static constexpr int kUnroll = kLoads == 1 ? 4 : 2;
  static constexpr int64_t kTileVectors = static_cast<int64_t>(kThreads) * kUnroll;
};

struct Lerp {
  float coeff = 0.0f;
  bool small_weight = true;
};

template <Op OP>
SEMA_HD Lerp lerp_weight(const float* w_ptr, float w_value) {
  Lerp lerp;
  if constexpr (OP == Op::kUpdate || OP == Op::kUpdateSwitch) {
    const float w = w_ptr != nullptr ? *w_ptr : w_value;
    lerp.small_weight = w < 0.5f;
    lerp.coeff = lerp.small_weight ? w : w - 1.0f;  // exact for w in [0.5, 1]
  }
  return lerp;
}

// One vector step: the vectors at ema[k * kThreads] for k in [FIRST, LAST]. All loads are
// issued before the first store.
template <typename E, typename P, Op OP, int FIRST, int LAST>
SEMA_HD void run_vectors(typename Traits<E, P, OP>::EVector* __restrict__ ema,
                         typename Traits<E, P, OP>::PVector* __restrict__ param, Lerp lerp) {
  using T = Traits<E, P, OP>;
  typename T::EVector e[LAST + 1];
  typename T::PVector p[LAST + 1]{};
#pragma unroll
  for (int k = FIRST; k <= LAST; ++k) {
    e[k] = ema[k * kThreads];
    if constexpr (T::kReadsParam) p[k] = param[k * kThreads];
  }
#pragma unroll
  for (int k = FIRST; k <= LAST; ++k) {
    if constexpr (OP == Op::kExchange) {  // E == P: swap whole vectors
      ema[k * kThreads] = p[k];
      param[k * kThreads] = e[k];
    } else {
#pragma unroll
      for (int i = 0; i < T::V; ++i) apply<E, P, OP>(e[k].v[i], p[k].v[i], lerp.coeff, lerp.small_weight);
      if constexpr (T::kWritesEma) ema[k * kThreads] = e[k];
      if constexpr (T::kWritesParam) param[k * kThreads] = p[k];
    }
  }
}

// What thread `thread` of a block does with the block's piece of `n` elements.
template <typename E, typename P, Op OP>
SEMA_HD void run_piece(typename E::Storage* __restrict__ ema, typename P::Storage* __restrict__ param, int64_t n,
                       Lerp lerp, unsigned thread) {
  using T = Traits<E, P, OP>;
  int64_t scalar_start = 0;
  if (((reinterpret_cast<uintptr_t>(ema) | reinterpret_cast<uintptr_t>(param)) & 15u) == 0) {
    auto* ema_vectors = reinterpret_cast<typename T::EVector*>(ema);
    auto* param_vectors = reinterpret_cast<typename T::PVector*>(param);
    const int64_t n_vectors = n / T::V;
    int64_t base = 0;
#pragma unroll 1
    for (; base + T::kTileVectors <= n_vectors; base += T::kTileVectors) {
      run_vectors<E, P, OP, 0, T::kUnroll - 1>(ema_vectors + base + thread, param_vectors + base + thread, lerp);
    }
    // the piece's last, partial tile: a vector at a time (once per block, few registers)
#pragma unroll 1
    for (int64_t v = base + thread; v < n_vectors; v += kThreads) {
      run_vectors<E, P, OP, 0, 0>(ema_vectors + v, param_vectors + v, lerp);
    }
    scalar_start = n_vectors * T::V;
  }
#pragma unroll 1
  for (int64_t i = scalar_start + thread; i < n; i += kThreads) {
    typename T::EStorage e = ema[i];
    typename T::PStorage p{};
    if constexpr (T::kReadsParam) p = param[i];
    apply<E, P, OP>(e, p, lerp.coeff, lerp.small_weight);
    if constexpr (T::kWritesEma) ema[i] = e;
    if constexpr (T::kWritesParam) param[i] = p;
  }
}

// Flat buffers: block `block` takes elements [block * piece, min((block + 1) * piece, n)).
template <typename E, typename P, Op OP>
SEMA_HD void run_flat_block(uintptr_t ema, uintptr_t param, int64_t n, int64_t piece, const float* w_ptr,
                            float w_value, int64_t block, unsigned thread) {
  const int64_t begin = block * piece;
  const int64_t count = n - begin < piece ? n - begin : piece;
  run_piece<E, P, OP>(reinterpret_cast<typename E::Storage*>(ema) + begin,
                      reinterpret_cast<typename P::Storage*>(param) + begin, count, lerp_weight<OP>(w_ptr, w_value),
                      thread);
}

// Multi-tensor: block `block` takes pieces[block], built by plan_pieces().
template <typename E, typename P, Op OP>
SEMA_HD void run_multi_block(const Piece* __restrict__ pieces, const float* w_ptr, float w_value, int64_t block,
                             unsigned thread) {
  const Piece piece = pieces[block];
  run_piece<E, P, OP>(reinterpret_cast<typename E::Storage*>(piece.ema),
                      reinterpret_cast<typename P::Storage*>(piece.param), piece.n, lerp_weight<OP>(w_ptr, w_value),
                      thread);
}

template <typename E, typename P, Op OP>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    ema_kernel(uintptr_t ema, uintptr_t param, int64_t n, int64_t piece, const float* __restrict__ w_ptr,
               float w_value) {
  run_flat_block<E, P, OP>(ema, param, n, piece, w_ptr, w_value, blockIdx.x, threadIdx.x);
}

template <typename E, typename P, Op OP>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    ema_multi_kernel(const Piece* __restrict__ pieces, const float* __restrict__ w_ptr, float w_value) {
  run_multi_block<E, P, OP>(pieces, w_ptr, w_value, blockIdx.x, threadIdx.x);
}

// --- K EMAs of one param, one pass ----------------------------------------------------------
//
// The param tile is loaded once into registers; then, one EMA at a time, that EMA's tile is
// loaded (all its 16-byte loads before its first store), updated by exactly the single op's
// apply<>() with w = ws[k], and stored. The EMA at `switch_index` also writes the param, from
// a copy: the later EMAs keep reading the param value from before the switch. Bytes per
// element: the param once (4 or 2), 8K for fp32 EMAs, + the param write with a switch.

constexpr int kMaxEmas = 8;

// The K EMAs' base addresses, in the kernel arguments (64 bytes of parameter space).
struct EmaAddresses {
  uintptr_t ema[kMaxEmas];
};

template <typename E, typename P>
struct KTraits {
  using Base = Traits<E, P, Op::kUpdate>;
  static constexpr int V = Base::V;
  using EVector = typename Base::EVector;
  using PVector = typename Base::PVector;
  // vectors per thread per tile: 4 EMA loads of 16 bytes per step (the first step also loads the
  // param tile), 32 registers of data at most
  static constexpr int kUnroll = sizeof(EVector) == 16 ? 4 : 2;
  // The multi-tensor kernel holds its piece's addresses in registers, not in the kernel
  // arguments: with 16-bit EMAs it spills at 4 vectors, so it takes 2 (2 EMA loads per step).
  static constexpr int kMultiUnroll = sizeof(typename E::Storage) == 2 ? 2 : kUnroll;
};

// The param a switch writes, from the stored EMA: its bits (equal dtypes) or its fp32 value
// rounded, which is the update's result: what apply<kUpdateSwitch>() writes, and switch_().
template <typename E, typename P, typename Vec>
SEMA_HD auto switched_param(const Vec& e) {
  Vector<typename P::Storage, sizeof(Vec) / sizeof(typename E::Storage)> p;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Vec) / sizeof(typename E::Storage)); ++i) {
    if constexpr (std::is_same_v<E, P>) {
      p.v[i] = e.v[i];
    } else {
      p.v[i] = P::store(E::load(e.v[i]));
    }
  }
  return p;
}

// One tile step: the vectors at [u * kThreads] for u < COUNT of the param and of every EMA.
// `ema_at(k)` is EMA k's base address; this thread's first EMA element is at ema_at(k) + first.
template <typename E, typename P, int COUNT, typename EmaAt>
SEMA_HD void run_k_vectors(const EmaAt& ema_at, int num_emas, typename KTraits<E, P>::PVector* __restrict__ param,
                           int64_t first, const float* __restrict__ ws, int switch_index) {
  using T = KTraits<E, P>;
  typename T::PVector p[COUNT];
#pragma unroll
  for (int u = 0; u < COUNT; ++u) p[u] = param[u * kThreads];
#pragma unroll 1
  for (int k = 0; k < num_emas; ++k) {
    auto* ema = reinterpret_cast<typename T::EVector*>(ema_at(k) + first);
    typename T::EVector e[COUNT];
#pragma unroll
    for (int u = 0; u < COUNT; ++u) e[u] = ema[u * kThreads];
    const Lerp lerp = lerp_weight<Op::kUpdate>(ws + k, 0.0f);
#pragma unroll
    for (int u = 0; u < COUNT; ++u) {
#pragma unroll
      for (int i = 0; i < T::V; ++i) apply<E, P, Op::kUpdate>(e[u].v[i], p[u].v[i], lerp.coeff, lerp.small_weight);
      ema[u * kThreads] = e[u];
      if (k == switch_index) param[u * kThreads] = switched_param<E, P>(e[u]);
    }
  }
}

// What thread `thread` of a block does with the block's piece: `n` elements from `begin` of every
// EMA (base addresses ema_at(k)), and from `param`.
template <typename E, typename P, int UNROLL, typename EmaAt>
SEMA_HD void run_k_piece(const EmaAt& ema_at, int num_emas, int64_t begin, typename P::Storage* __restrict__ param,
                         int64_t n, const float* __restrict__ ws, int switch_index, unsigned thread) {
  using T = KTraits<E, P>;
  uintptr_t addresses = reinterpret_cast<uintptr_t>(param);
#pragma unroll 1
  for (int k = 0; k < num_emas; ++k) addresses |= reinterpret_cast<uintptr_t>(ema_at(k) + begin);
  int64_t scalar_start = 0;
  if ((addresses & 15u) == 0) {
    auto* param_vectors = reinterpret_cast<typename T::PVector*>(param);
    const int64_t n_vectors = n / T::V;
    int64_t base = 0;
    constexpr int64_t kTileVectors = static_cast<int64_t>(kThreads) * UNROLL;
#pragma unroll 1
    for (; base + kTileVectors <= n_vectors; base += kTileVectors) {
      run_k_vectors<E, P, UNROLL>(ema_at, num_emas, param_vectors + base + thread, begin + (base + thread) * T::V, ws,
                                  switch_index);
    }
#pragma unroll 1
    for (int64_t v = base + thread; v < n_vectors; v += kThreads) {
      run_k_vectors<E, P, 1>(ema_at, num_emas, param_vectors + v, begin + v * T::V, ws, switch_index);
    }
    scalar_start = n_vectors * T::V;
  }
#pragma unroll 1
  for (int64_t i = scalar_start + thread; i < n; i += kThreads) {
    const typename P::Storage p = param[i];
#pragma unroll 1
    for (int k = 0; k < num_emas; ++k) {
      typename E::Storage* ema = ema_at(k) + begin;
      typename E::Storage e = ema[i];
      typename P::Storage unchanged = p;
      const Lerp lerp = lerp_weight<Op::kUpdate>(ws + k, 0.0f);
      apply<E, P, Op::kUpdate>(e, unchanged, lerp.coeff, lerp.small_weight);
      ema[i] = e;
      if (k == switch_index) param[i] = switched_param<E, P>(Vector<typename E::Storage, 1>{{e}}).v[0];
    }
  }
}

// Flat buffers: block `block` takes elements [block * piece, min((block + 1) * piece, n)) of all.
template <typename E, typename P>
SEMA_HD void run_k_flat_block(const EmaAddresses& emas, int num_emas, uintptr_t param, int64_t n, int64_t piece,
                              const float* ws, int switch_index, int64_t block, unsigned thread) {
  const int64_t begin = block * piece;
  const int64_t count = n - begin < piece ? n - begin : piece;
  const auto ema_at = [&](int k) { return reinterpret_cast<typename E::Storage*>(emas.ema[k]); };
  auto* param_piece = reinterpret_cast<typename P::Storage*>(param) + begin;
  run_k_piece<E, P, KTraits<E, P>::kUnroll>(ema_at, num_emas, begin, param_piece, count, ws, switch_index, thread);
}

// Multi-tensor: block `block` takes row `block` of a K-EMA piece table, built by plan_k_pieces():
// (param address, count, K EMA addresses), K + 2 int64 words.
template <typename E, typename P>
SEMA_HD void run_k_multi_block(const int64_t* __restrict__ pieces, int num_emas, const float* ws, int switch_index,
                               int64_t block, unsigned thread) {
  const int64_t* row = pieces + block * (num_emas + 2);
  // the row's address is recomputed from the kernel arguments, not held in two registers
  const auto ema_at = [&](int k) {
    return reinterpret_cast<typename E::Storage*>(static_cast<uintptr_t>(pieces[block * (num_emas + 2) + 2 + k]));
  };
  auto* param_piece = reinterpret_cast<typename P::Storage*>(static_cast<uintptr_t>(row[0]));
  run_k_piece<E, P, KTraits<E, P>::kMultiUnroll>(ema_at, num_emas, 0, param_piece, row[1], ws, switch_index, thread);
}

template <typename E, typename P>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    ema_k_kernel(const __grid_constant__ EmaAddresses emas, int num_emas, uintptr_t param, int64_t n, int64_t piece,
                 const float* __restrict__ ws, int switch_index) {
  run_k_flat_block<E, P>(emas, num_emas, param, n, piece, ws, switch_index, blockIdx.x, threadIdx.x);
}

template <typename E, typename P>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    ema_k_multi_kernel(const int64_t* __restrict__ pieces, int num_emas, const float* __restrict__ ws,
                       int switch_index) {
  run_k_multi_block<E, P>(pieces, num_emas, ws, switch_index, blockIdx.x, threadIdx.x);
}

// The grid of a flat launch: at most `capacity` blocks (all resident at once), at least
// kThreads vectors per block, pieces of equal size in whole vectors.
struct FlatGrid {
  int64_t blocks;
  int64_t piece;
};

template <int V>
FlatGrid flat_grid(int64_t n, int64_t capacity) {
  int64_t blocks = ceil_div(n, static_cast<int64_t>(kThreads) * V);
  if (blocks > capacity) blocks = capacity;
  const int64_t piece = ceil_div(ceil_div(n, blocks), V) * V;
  return {ceil_div(n, piece), piece};
}

struct Pair {
  uintptr_t ema;
  uintptr_t param;
  int64_t numel;
};

// The pieces of a multi-tensor launch: every non-empty tensor cut into pieces of one size (a
// whole number of vectors, so a piece starts 16-byte aligned where its tensor does). With
// fewer tensors than half the capacity, the size is chosen so that the pieces, partial last
// pieces included, number at most `capacity`: one wave. More tensors than that: many waves,
// each block one piece of at most that size.
template <int V>
int64_t piece_size(const std::vector<int64_t>& numels, int64_t capacity) {
  int64_t total = 0, tensors = 0;
  for (const int64_t numel : numels) {
    total += numel;
    tensors += numel > 0;
  }
  if (total == 0) return 0;
  const int64_t target = 2 * tensors <= capacity ? capacity - tensors : capacity;
  int64_t piece = ceil_div(total, target);
  if (piece < static_cast<int64_t>(kThreads) * V) piece = static_cast<int64_t>(kThreads) * V;
  return ceil_div(piece, V) * V;
}

template <int V>
std::vector<Piece> plan_pieces(const std::vector<Pair>& pairs, int ema_size, int param_size, int64_t capacity) {
  std::vector<int64_t> numels;
  for (const Pair& pair : pairs) numels.push_back(pair.numel);
  const int64_t piece = piece_size<V>(numels, capacity);
  std::vector<Piece> pieces;
  if (piece == 0) return pieces;
  for (const Pair& pair : pairs) {
    for (int64_t begin = 0; begin < pair.numel; begin += piece) {
      const int64_t count = pair.numel - begin < piece ? pair.numel - begin : piece;
      pieces.push_back({pair.ema + static_cast<uintptr_t>(begin) * ema_size,
                        pair.param + static_cast<uintptr_t>(begin) * param_size, count});
    }
  }
  return pieces;
}

// The rows of a K-EMA multi-tensor launch, cut as plan_pieces() cuts: (param address, count,
// then the K EMA addresses) per piece. emas[k][i] is EMA k of tensor i.
template <int V>
std::vector<int64_t> plan_k_pieces(const std::vector<std::vector<uintptr_t>>& emas,
                                   const std::vector<uintptr_t>& params, const std::vector<int64_t>& numels,
                                   int ema_size, int param_size, int64_t capacity) {
  const int64_t piece = piece_size<V>(numels, capacity);
  std::vector<int64_t> rows;
  if (piece == 0) return rows;
  for (size_t i = 0; i < params.size(); ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += piece) {
      rows.push_back(static_cast<int64_t>(params[i] + static_cast<uintptr_t>(begin) * param_size));
      rows.push_back(numels[i] - begin < piece ? numels[i] - begin : piece);
      for (const std::vector<uintptr_t>& ema : emas) {
        rows.push_back(static_cast<int64_t>(ema[i] + static_cast<uintptr_t>(begin) * ema_size));
      }
    }
  }
  return rows;
}

[[noreturn]] void raise_cuda_error(const char* op, const char* what, cudaError_t error) {
  throw std::runtime_error(std::string(op) + ": " + what + " failed with CUDA error " + cudaGetErrorName(error) + " (" +
                           cudaGetErrorString(error) + ")");
}

#define SEMA_CUDA_CHECK(op, call)                               \
  do {                                                          \
    const cudaError_t sema_error_ = (call);                     \
    if (sema_error_ != cudaSuccess) raise_cuda_error(op, #call, sema_error_); \
  } while (0)

// Makes `device` current for the launch and puts the previous device back afterwards.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device) : device_(device) {
    SEMA_CUDA_CHECK(op, cudaGetDevice(&previous_));
    if (previous_ != device_) SEMA_CUDA_CHECK(op, cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = -1;
};

// Calls fn(E{}, P{}) with the element types of an update's dtype pair.
template <typename Fn>
void dispatch_update_types(const char* op, int ema_dtype, int param_dtype, const Fn& fn) {
  if (ema_dtype == kFloat32 && param_dtype == kFloat32) {
    fn(Float32{}, Float32{});
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16) {
    fn(Float32{}, BFloat16{});
  } else if (ema_dtype == kFloat32 && param_dtype == kFloat16) {
    fn(Float32{}, Float16{});
  } else if (ema_dtype == kBFloat16 && param_dtype == kBFloat16) {
    fn(BFloat16{}, BFloat16{});
  } else if (ema_dtype == kFloat16 && param_dtype == kFloat16) {
    fn(Float16{}, Float16{});
  } else {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype pair");
  }
}

#ifdef SEMA_CUDA_HOST_EMULATION
int64_t emulated_capacity = 132 * 8;  // an H200's SMs x 8 blocks; tests/test_cuda_emulated.py varies it

template <typename E, typename P, Op OP>
int64_t multi_capacity(const char*, int) {
  return emulated_capacity;
}

template <typename E, typename P, Op OP>
void launch_flat(const char*, uintptr_t ema, uintptr_t param, int64_t n, const float* w_ptr, float w_value, int,
                 cudaStream_t) {
  if (n == 0) return;
  const FlatGrid grid = flat_grid<Traits<E, P, OP>::V>(n, emulated_capacity);
  for (int64_t block = 0; block < grid.blocks; ++block) {
    for (unsigned thread = 0; thread < kThreads; ++thread) {
      run_flat_block<E, P, OP>(ema, param, n, grid.piece, w_ptr, w_value, block, thread);
    }
  }
}

template <typename E, typename P, Op OP>
void launch_multi(const char*, const Piece* pieces, int64_t count, const float* w_ptr, float w_value, int,
                  cudaStream_t) {
  for (int64_t block = 0; block < count; ++block) {
    for (unsigned thread = 0; thread < kThreads; ++thread) {
      run_multi_block<E, P, OP>(pieces, w_ptr, w_value, block, thread);
    }
  }
}

template <typename E, typename P>
int64_t k_multi_capacity(const char*, int) {
  return emulated_capacity;
}

template <typename E, typename P>
void launch_k_flat(const char*, const EmaAddresses& emas, int num_emas, uintptr_t param, int64_t n, const float* ws,
                   int switch_index, int, cudaStream_t) {
  if (n == 0) return;
  const FlatGrid grid = flat_grid<KTraits<E, P>::V>(n, emulated_capacity);
  for (int64_t block = 0; block < grid.blocks; ++block) {
    for (unsigned thread = 0; thread < kThreads; ++thread) {
      run_k_flat_block<E, P>(emas, num_emas, param, n, grid.piece, ws, switch_index, block, thread);
    }
  }
}

template <typename E, typename P>
void launch_k_multi(const char*, const int64_t* pieces, int64_t count, int num_emas, const float* ws,
                    int switch_index, int, cudaStream_t) {
  for (int64_t block = 0; block < count; ++block) {
    for (unsigned thread = 0; thread < kThreads; ++thread) {
      run_k_multi_block<E, P>(pieces, num_emas, ws, switch_index, block, thread);
    }
  }
}
#else
// Blocks of `kernel` resident on `device` at once: SMs x the occupancy API's blocks per SM.
// Asked once per kernel and device (the template's statics are per kernel).
template <typename Kernel>
int64_t resident_blocks(const char* op, Kernel kernel, int device) {
  static std::mutex mutex;
  static std::map<int, int64_t> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device);
  if (found != known.end()) return found->second;
  int sm_count = 0, per_sm = 0;
  SEMA_CUDA_CHECK(op, cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  SEMA_CUDA_CHECK(op, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t blocks = static_cast<int64_t>(sm_count) * (per_sm > 0 ? per_sm : 1);
  known.emplace(device, blocks);
  return blocks;
}

// The pieces of a multi-tensor launch must fit either variant (update, update + switch) in one wave.
template <typename E, typename P, Op OP>
int64_t multi_capacity(const char* op, int device) {
  DeviceGuard guard(op, device);
  const int64_t update = resident_blocks(op, ema_multi_kernel<E, P, Op::kUpdate>, device);
  const int64_t update_switch = resident_blocks(op, ema_multi_kernel<E, P, Op::kUpdateSwitch>, device);
  return update < update_switch ? update : update_switch;
}

template <typename E, typename P, Op OP>
void launch_flat(const char* op, uintptr_t ema, uintptr_t param, int64_t n, const float* w_ptr, float w_value,
                 int device, cudaStream_t stream) {
  if (n == 0) return;
  DeviceGuard guard(op, device);
  const FlatGrid grid = flat_grid<Traits<E, P, OP>::V>(n, resident_blocks(op, ema_kernel<E, P, OP>, device));
  ema_kernel<E, P, OP><<<static_cast<unsigned>(grid.blocks), kThreads, 0, stream>>>(ema, param, n, grid.piece, w_ptr,
                                                                                      w_value);
  SEMA_CUDA_CHECK(op, cudaGetLastError());
}

template <typename E, typename P, Op OP>
void launch_multi(const char* op, const Piece* pieces, int64_t count, const float* w_ptr, float w_value, int device,
                  cudaStream_t stream) {
  if (count == 0) return;
  DeviceGuard guard(op, device);
  ema_multi_kernel<E, P, OP><<<static_cast<unsigned>(count), kThreads, 0, stream>>>(pieces, w_ptr, w_value);
  SEMA_CUDA_CHECK(op, cudaGetLastError());
}

template <typename E, typename P>
int64_t k_multi_capacity(const char* op, int device) {
  DeviceGuard guard(op, device);
  return resident_blocks(op, ema_k_multi_kernel<E, P>, device);
}

template <typename E, typename P>
void launch_k_flat(const char* op, const EmaAddresses& emas, int num_emas, uintptr_t param, int64_t n,
                   const float* ws, int switch_index, int device, cudaStream_t stream) {
  if (n == 0) return;
  DeviceGuard guard(op, device);
  const FlatGrid grid = flat_grid<KTraits<E, P>::V>(n, resident_blocks(op, ema_k_kernel<E, P>, device));
  ema_k_kernel<E, P><<<static_cast<unsigned>(grid.blocks), kThreads, 0, stream>>>(emas, num_emas, param, n,
                                                                                 grid.piece, ws, switch_index);
  SEMA_CUDA_CHECK(op, cudaGetLastError());
}

template <typename E, typename P>
void launch_k_multi(const char* op, const int64_t* pieces, int64_t count, int num_emas, const float* ws,
                    int switch_index, int device, cudaStream_t stream) {
  if (count == 0) return;
  DeviceGuard guard(op, device);
  ema_k_multi_kernel<E, P><<<static_cast<unsigned>(count), kThreads, 0, stream>>>(pieces, num_emas, ws,
                                                                                  switch_index);
  SEMA_CUDA_CHECK(op, cudaGetLastError());
}
#endif

}  // namespace

// Entry points. bindings.cpp validated pointers, lengths, alignment and dtype codes.

void ema_update(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, float w_value,
                uintptr_t w_ptr, bool switch_param, int device, uintptr_t stream) {
  const auto* w = reinterpret_cast<const float*>(w_ptr);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const char* op = switch_param ? "sema ema_update_(switch=True) [cuda]" : "sema ema_update_ [cuda]";
  dispatch_update_types(op, ema_dtype, param_dtype, [&](auto e, auto p) {
    using E = decltype(e);
    using P = decltype(p);
    if (switch_param) {
      launch_flat<E, P, Op::kUpdateSwitch>(op, ema, param, n, w, w_value, device, cuda_stream);
    } else {
      launch_flat<E, P, Op::kUpdate>(op, ema, param, n, w, w_value, device, cuda_stream);
    }
  });
}

// The piece table of one dtype pair's multi-tensor update: (ema address, param address, count)
// per block, as int64 triples, for the caller to copy to the device and pass to
// ema_update_multi_pieces. Its size depends on the device (SMs, occupancy).
std::vector<int64_t> plan_update_multi(const std::vector<uintptr_t>& emas, const std::vector<uintptr_t>& params,
                                       const std::vector<int64_t>& numels, int ema_dtype, int param_dtype,
                                       int device) {
  const char* op = "sema ema_update_multi_ [cuda] plan";
  std::vector<Pair> pairs;
  pairs.reserve(emas.size());
  for (size_t i = 0; i < emas.size(); ++i) pairs.push_back({emas[i], params[i], numels[i]});
  std::vector<int64_t> table;
  dispatch_update_types(op, ema_dtype, param_dtype, [&](auto e, auto p) {
    using E = decltype(e);
    using P = decltype(p);
    const std::vector<Piece> pieces =
        plan_pieces<Traits<E, P, Op::kUpdate>::V>(pairs, static_cast<int>(sizeof(typename E::Storage)),
                                                   static_cast<int>(sizeof(typename P::Storage)),
                                                   multi_capacity<E, P, Op::kUpdate>(op, device));
    table.reserve(3 * pieces.size());
    for (const Piece& piece : pieces) {
      table.push_back(static_cast<int64_t>(piece.ema));
      table.push_back(static_cast<int64_t>(piece.param));
      table.push_back(piece.n);
    }
  });
  return table;
}

// One launch of `count` blocks over a device table from plan_update_multi.
void ema_update_multi_pieces(uintptr_t pieces, int64_t count, int ema_dtype, int param_dtype, float w_value,
                             uintptr_t w_ptr, bool switch_param, int device, uintptr_t stream) {
  const char* op = switch_param ? "sema ema_update_multi_(switch=True) [cuda]" : "sema ema_update_multi_ [cuda]";
  const auto* table = reinterpret_cast<const Piece*>(pieces);
  const auto* w = reinterpret_cast<const float*>(w_ptr);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_update_types(op, ema_dtype, param_dtype, [&](auto e, auto p) {
    using E = decltype(e);
    using P = decltype(p);
    if (switch_param) {
      launch_multi<E, P, Op::kUpdateSwitch>(op, table, count, w, w_value, device, cuda_stream);
    } else {
      launch_multi<E, P, Op::kUpdate>(op, table, count, w, w_value, device, cuda_stream);
    }
  });
}

// K EMAs of one flat param in one pass (1 <= K <= kMaxEmas); ws: K fp32 weights on the device;
// switch_index in [0, K) switches the param to that EMA after the update, -1 does not.
void ema_update_k(const std::vector<uintptr_t>& emas, uintptr_t param, int64_t n, int ema_dtype, int param_dtype,
                  uintptr_t ws_ptr, int switch_index, int device, uintptr_t stream) {
  const char* op = switch_index >= 0 ? "sema ema_update_k_(switch_index) [cuda]" : "sema ema_update_k_ [cuda]";
  if (emas.empty() || emas.size() > static_cast<size_t>(kMaxEmas)) {
    throw std::invalid_argument(std::string(op) + ": " + std::to_string(emas.size()) + " EMAs; one pass takes 1 to " +
                                std::to_string(kMaxEmas));
  }
  EmaAddresses addresses{};
  for (size_t k = 0; k < emas.size(); ++k) addresses.ema[k] = emas[k];
  const auto* ws = reinterpret_cast<const float*>(ws_ptr);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int num_emas = static_cast<int>(emas.size());
  dispatch_update_types(op, ema_dtype, param_dtype, [&](auto e, auto p) {
    launch_k_flat<decltype(e), decltype(p)>(op, addresses, num_emas, param, n, ws, switch_index, device, cuda_stream);
  });
}

// The piece table of a K-EMA multi-tensor update of one dtype pair: rows of K + 2 int64 words
// (param address, count, K EMA addresses), for the caller to copy to the device and pass to
// ema_update_k_multi_pieces. emas[k][i] is EMA k of tensor i.
std::vector<int64_t> plan_update_k_multi(const std::vector<std::vector<uintptr_t>>& emas,
                                         const std::vector<uintptr_t>& params, const std::vector<int64_t>& numels,
                                         int ema_dtype, int param_dtype, int device) {
  const char* op = "sema ema_update_k_multi_ [cuda] plan";
  if (emas.empty() || emas.size() > static_cast<size_t>(kMaxEmas)) {
    throw std::invalid_argument(std::string(op) + ": " + std::to_string(emas.size()) + " EMAs; one pass takes 1 to " +
                                std::to_string(kMaxEmas));
  }
  std::vector<int64_t> table;
  dispatch_update_types(op, ema_dtype, param_dtype, [&](auto e, auto p) {
    using E = decltype(e);
    using P = decltype(p);
    table = plan_k_pieces<KTraits<E, P>::V>(emas, params, numels, static_cast<int>(sizeof(typename E::Storage)),
                                            static_cast<int>(sizeof(typename P::Storage)),
                                            k_multi_capacity<E, P>(op, device));
  });
  return table;
}

// One launch of `count` blocks over a device table from plan_update_k_multi with `num_emas` EMAs.
void ema_update_k_multi_pieces(uintptr_t pieces, int64_t count, int num_emas, int ema_dtype, int param_dtype,
                               uintptr_t ws_ptr, int switch_index, int device, uintptr_t stream) {
  const char* op =
      switch_index >= 0 ? "sema ema_update_k_multi_(switch_index) [cuda]" : "sema ema_update_k_multi_ [cuda]";
  const auto* table = reinterpret_cast<const int64_t*>(pieces);
  const auto* ws = reinterpret_cast<const float*>(ws_ptr);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_update_types(op, ema_dtype, param_dtype, [&](auto e, auto p) {
    launch_k_multi<decltype(e), decltype(p)>(op, table, count, num_emas, ws, switch_index, device, cuda_stream);
  });
}

void switch_param(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, int device,
                  uintptr_t stream) {
  const char* op = "sema switch_ [cuda]";
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (ema_dtype == param_dtype && ema_dtype == kFloat32) {
    launch_flat<Word32, Word32, Op::kSwitch>(op, ema, param, n, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == param_dtype) {
    launch_flat<Word16, Word16, Op::kSwitch>(op, ema, param, n, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16) {
    launch_flat<Float32, BFloat16, Op::kSwitch>(op, ema, param, n, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kFloat16) {
    launch_flat<Float32, Float16, Op::kSwitch>(op, ema, param, n, nullptr, 0.0f, device, cuda_stream);
  } else {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype pair");
  }
}

void swap(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, bool restore, int device,
          uintptr_t stream) {
  const char* op = restore ? "sema swap_(restore=True) [cuda]" : "sema swap_ [cuda]";
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (ema_dtype == param_dtype && ema_dtype == kFloat32) {
    launch_flat<Word32, Word32, Op::kExchange>(op, ema, param, n, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == param_dtype) {
    launch_flat<Word16, Word16, Op::kExchange>(op, ema, param, n, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16 && restore) {
    launch_flat<Word32, Word16, Op::kUnpack>(op, ema, param, n, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16) {
    launch_flat<Word32, Word16, Op::kPack>(op, ema, param, n, nullptr, 0.0f, device, cuda_stream);
  } else {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype pair");
  }
}

#ifdef SEMA_CUDA_HOST_EMULATION
void set_emulated_capacity(int64_t blocks) { emulated_capacity = blocks; }
#else
// "" when the kernels can run on `device`, else the reason they cannot.
std::string probe(int device) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    return std::string("the CUDA runtime linked into sema._C cannot start: ") + cudaGetErrorName(error) + " (" +
           cudaGetErrorString(error) + ")";
  }
  if (device < 0 || device >= count) {
    return "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " visible)";
  }
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaFuncAttributes attributes{};
  error = cudaFuncGetAttributes(&attributes, ema_kernel<Float32, Float32, Op::kUpdate>);
  if (previous != device) cudaSetDevice(previous);
  if (error != cudaSuccess) {
    return "no kernel in sema._C runs on CUDA device " + std::to_string(device) + " (sm_" + std::to_string(major) +
           std::to_string(minor) + "; built for " + SEMA_STRINGIFY(__CUDA_ARCH_LIST__) + "): " +
           cudaGetErrorName(error) + "; rebuild with SEMA_CUDA_ARCHS including " + std::to_string(major) +
           std::to_string(minor);
  }
  return "";
}

// Build and run-time facts for build_info(): the compiled architectures come from nvcc itself.
std::string compiled_archs() { return SEMA_STRINGIFY(__CUDA_ARCH_LIST__); }

int ptx_arch() {
#ifdef SEMA_CUDA_PTX_ARCH
  return SEMA_CUDA_PTX_ARCH;
#else
  return 0;
#endif
}

std::string nvcc_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) + "." +
         std::to_string(__CUDACC_VER_BUILD__);
}

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

int driver_version() {
  int version = 0;
  cudaDriverGetVersion(&version);
  return version;
}
#endif  // SEMA_CUDA_HOST_EMULATION

}  // namespace cuda
}  // namespace sema

#ifdef SEMA_CUDA_HOST_EMULATION
// C entry points of the test build (ctypes): 0 on success, else 1 and the exception's message.
namespace {
template <typename Call>
int report(char* error, int64_t error_size, const Call& call) {
  try {
    call();
    return 0;
  } catch (const std::exception& exc) {
    std::snprintf(error, static_cast<size_t>(error_size), "%s", exc.what());
    return 1;
  }
}
}  // namespace

extern "C" {
void sema_emulated_set_max_blocks(int64_t blocks) { sema::cuda::set_emulated_capacity(blocks); }

int sema_emulated_update(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, float w_value,
                         uintptr_t w_ptr, int switch_param, char* error, int64_t error_size) {
  return report(error, error_size, [&] {
    sema::cuda::ema_update(ema, param, n, ema_dtype, param_dtype, w_value, w_ptr, switch_param != 0, 0, 0);
  });
}

// The grid of a flat launch of n elements, `vector` (4 or 8) elements per 16 bytes.
int sema_emulated_flat_grid(int64_t n, int vector, int64_t* blocks, int64_t* piece) {
  if (n <= 0 || (vector != 4 && vector != 8)) return 1;
  const sema::cuda::FlatGrid grid = vector == 4 ? sema::cuda::flat_grid<4>(n, sema::cuda::emulated_capacity)
                                                : sema::cuda::flat_grid<8>(n, sema::cuda::emulated_capacity);
  *blocks = grid.blocks;
  *piece = grid.piece;
  return 0;
}

// The piece table of one dtype pair into `table` (room for `table_size` int64); its length in *written.
int sema_emulated_plan_multi(const uintptr_t* emas, const uintptr_t* params, const int64_t* numels, int64_t count,
                             int ema_dtype, int param_dtype, int64_t* table, int64_t table_size, int64_t* written,
                             char* error, int64_t error_size) {
  return report(error, error_size, [&] {
    const std::vector<int64_t> plan = sema::cuda::plan_update_multi(
        {emas, emas + count}, {params, params + count}, {numels, numels + count}, ema_dtype, param_dtype, 0);
    if (static_cast<int64_t>(plan.size()) > table_size) throw std::length_error("piece table larger than the buffer");
    std::memcpy(table, plan.data(), plan.size() * sizeof(int64_t));
    *written = static_cast<int64_t>(plan.size());
  });
}

// What sema/_ext_cuda.py does on the device: one piece table and one launch per dtype pair.
int sema_emulated_update_multi(const uintptr_t* emas, const uintptr_t* params, const int64_t* numels,
                               const int* ema_dtypes, const int* param_dtypes, int64_t count, float w_value,
                               uintptr_t w_ptr, int switch_param, char* error, int64_t error_size) {
  return report(error, error_size, [&] {
    std::vector<bool> done(count, false);
    for (int64_t i = 0; i < count; ++i) {
      if (done[i]) continue;
      std::vector<uintptr_t> group_emas, group_params;
      std::vector<int64_t> group_numels;
      for (int64_t j = i; j < count; ++j) {
        if (!done[j] && ema_dtypes[j] == ema_dtypes[i] && param_dtypes[j] == param_dtypes[i]) {
          group_emas.push_back(emas[j]);
          group_params.push_back(params[j]);
          group_numels.push_back(numels[j]);
          done[j] = true;
        }
      }
      const std::vector<int64_t> table = sema::cuda::plan_update_multi(group_emas, group_params, group_numels,
                                                                       ema_dtypes[i], param_dtypes[i], 0);
      sema::cuda::ema_update_multi_pieces(reinterpret_cast<uintptr_t>(table.data()),
                                          static_cast<int64_t>(table.size() / 3), ema_dtypes[i], param_dtypes[i],
                                          w_value, w_ptr, switch_param != 0, 0, 0);
    }
  });
}

int sema_emulated_switch(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, char* error,
                         int64_t error_size) {
  return report(error, error_size, [&] { sema::cuda::switch_param(ema, param, n, ema_dtype, param_dtype, 0, 0); });
}

int sema_emulated_swap(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, int restore,
                       char* error, int64_t error_size) {
  return report(error, error_size,
                [&] { sema::cuda::swap(ema, param, n, ema_dtype, param_dtype, restore != 0, 0, 0); });
}

int sema_emulated_update_k(const uintptr_t* emas, int num_emas, uintptr_t param, int64_t n, int ema_dtype,
                           int param_dtype, uintptr_t ws_ptr, int switch_index, char* error, int64_t error_size) {
  return report(error, error_size, [&] {
    sema::cuda::ema_update_k({emas, emas + num_emas}, param, n, ema_dtype, param_dtype, ws_ptr, switch_index, 0, 0);
  });
}

// What sema/_ext_cuda.py does on the device for one dtype pair: one K-EMA piece table, one launch.
// emas holds num_emas rows of `count` addresses (EMA k of tensor i at emas[k * count + i]).
int sema_emulated_update_k_multi(const uintptr_t* emas, int num_emas, const uintptr_t* params, const int64_t* numels,
                                 int64_t count, int ema_dtype, int param_dtype, uintptr_t ws_ptr, int switch_index,
                                 char* error, int64_t error_size) {
  return report(error, error_size, [&] {
    std::vector<std::vector<uintptr_t>> ema_rows;
    for (int k = 0; k < num_emas; ++k) ema_rows.emplace_back(emas + k * count, emas + (k + 1) * count);
    const std::vector<int64_t> table = sema::cuda::plan_update_k_multi(
        ema_rows, {params, params + count}, {numels, numels + count}, ema_dtype, param_dtype, 0);
    sema::cuda::ema_update_k_multi_pieces(reinterpret_cast<uintptr_t>(table.data()),
                                          static_cast<int64_t>(table.size()) / (num_emas + 2), num_emas, ema_dtype,
                                          param_dtype, ws_ptr, switch_index, 0, 0);
  });
}

// The K-EMA piece table of one dtype pair into `table` (room for `table_size` int64).
int sema_emulated_plan_k_multi(const uintptr_t* emas, int num_emas, const uintptr_t* params, const int64_t* numels,
                               int64_t count, int ema_dtype, int param_dtype, int64_t* table, int64_t table_size,
                               int64_t* written, char* error, int64_t error_size) {
  return report(error, error_size, [&] {
    std::vector<std::vector<uintptr_t>> ema_rows;
    for (int k = 0; k < num_emas; ++k) ema_rows.emplace_back(emas + k * count, emas + (k + 1) * count);
    const std::vector<int64_t> plan = sema::cuda::plan_update_k_multi(
        ema_rows, {params, params + count}, {numels, numels + count}, ema_dtype, param_dtype, 0);
    if (static_cast<int64_t>(plan.size()) > table_size) throw std::length_error("piece table larger than the buffer");
    std::memcpy(table, plan.data(), plan.size() * sizeof(int64_t));
    *written = static_cast<int64_t>(plan.size());
  });
}
}  // extern "C"
#endif  // SEMA_CUDA_HOST_EMULATION
