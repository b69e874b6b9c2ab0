// CUDA kernels of the sema op contract: EMA update (+ switch), switch, swap, on flat buffers
// or on a table of up to kMaxTensors buffers per launch (the multi-tensor update).
//
// One kernel template, the op a template flag. Work is cut into chunks of kChunkElements
// inside each tensor; blocks walk the chunks grid-stride, and threads walk a chunk in 16-byte
// vectors (the narrower dtype's width sets the element count; the wider one takes two
// 16-byte accesses), with a scalar path for a tensor's tail and for unaligned pointers.
// Every offset is int64: buffers past 2**31 elements are real.
//
// The lerp is fma(coeff, p - e, base), (coeff, base) = (w, e) if w < 0.5 else (w - 1, p):
// the value PyTorch's CUDA lerp gives once nvcc contracts its two-branch formula. w comes
// either as a value or as a pointer to one fp32 on the device (no host sync, graph capturable).
//
// The kernel body is __host__ __device__ and takes its block and thread indices as arguments,
// so that a test build (-DSEMA_CUDA_HOST_EMULATION, tests/test_cuda_emulated.py) runs these
// very kernels, launch tables and dtype dispatch on the CPU, one (block, thread) at a time:
// each element belongs to exactly one thread and no thread reads another's, so running the
// threads in turn gives what the GPU gives (casts in the CUDA headers' host implementations).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
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
constexpr int kBlocksPerSm = 4;  // 1024 threads per SM at <= 64 registers each
constexpr int64_t kChunkElements = 8192;
// 64 tensors: 64 * 32 bytes of pointers, lengths and chunk offsets, within the 4 KiB of
// kernel arguments every supported architecture accepts.
constexpr int kMaxTensors = 64;

struct TensorTable {
  uintptr_t ema[kMaxTensors];
  uintptr_t param[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_chunk[kMaxTensors + 1];  // prefix sums of chunk counts; [count] is the total
  int count;
};

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

// What thread `thread` of block `block` (of `grid`) does: the whole kernel, minus the indices.
template <typename E, typename P, Op OP>
SEMA_HD void run_thread(const TensorTable& table, const float* __restrict__ w_ptr, float w_value, int64_t block,
                        int64_t grid, unsigned thread) {
  using EStorage = typename E::Storage;
  using PStorage = typename P::Storage;
  // elements per 16 bytes of the narrower dtype (8 for fp32 ema with bf16 params: 32 + 16 bytes)
  constexpr int V = 16 / (sizeof(EStorage) < sizeof(PStorage) ? sizeof(EStorage) : sizeof(PStorage));
  constexpr bool kReadsParam = OP != Op::kSwitch;
  constexpr bool kWritesEma = OP != Op::kSwitch;
  constexpr bool kWritesParam = OP != Op::kUpdate;

  float coeff = 0.0f;
  bool small_weight = true;
  if constexpr (OP == Op::kUpdate || OP == Op::kUpdateSwitch) {
    const float w = w_ptr != nullptr ? *w_ptr : w_value;
    small_weight = w < 0.5f;
    coeff = small_weight ? w : w - 1.0f;  // exact for w in [0.5, 1]
  }

  const int64_t total_chunks = table.first_chunk[table.count];
  for (int64_t chunk = block; chunk < total_chunks; chunk += grid) {
    int lo = 0;  // binary search for the last tensor whose first chunk is <= chunk
    int hi = table.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (table.first_chunk[mid] <= chunk) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const int t = lo;
    const int64_t begin = (chunk - table.first_chunk[t]) * kChunkElements;
    const int64_t remaining = table.numel[t] - begin;
    const int64_t n = remaining < kChunkElements ? remaining : kChunkElements;
    EStorage* __restrict__ ema = reinterpret_cast<EStorage*>(table.ema[t]) + begin;
    PStorage* __restrict__ param = reinterpret_cast<PStorage*>(table.param[t]) + begin;

    int64_t scalar_start = 0;
    if (((reinterpret_cast<uintptr_t>(ema) | reinterpret_cast<uintptr_t>(param)) & 15u) == 0) {
      using EVector = Vector<EStorage, V>;
      using PVector = Vector<PStorage, V>;
      const int64_t n_vectors = n / V;
      for (int64_t v = thread; v < n_vectors; v += kThreads) {
        EVector e = reinterpret_cast<const EVector*>(ema)[v];
        PVector p;
        if constexpr (kReadsParam) p = reinterpret_cast<const PVector*>(param)[v];
        if constexpr (OP == Op::kExchange) {  // E == P: swap whole vectors
          reinterpret_cast<EVector*>(ema)[v] = p;
          reinterpret_cast<PVector*>(param)[v] = e;
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) apply<E, P, OP>(e.v[k], p.v[k], coeff, small_weight);
          if constexpr (kWritesEma) reinterpret_cast<EVector*>(ema)[v] = e;
          if constexpr (kWritesParam) reinterpret_cast<PVector*>(param)[v] = p;
        }
      }
      scalar_start = n_vectors * V;
    }
    for (int64_t i = scalar_start + thread; i < n; i += kThreads) {
      EStorage e = ema[i];
      PStorage p{};
      if constexpr (kReadsParam) p = param[i];
      apply<E, P, OP>(e, p, coeff, small_weight);
      if constexpr (kWritesEma) ema[i] = e;
      if constexpr (kWritesParam) param[i] = p;
    }
  }
}

template <typename E, typename P, Op OP>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    ema_kernel(const __grid_constant__ TensorTable table, const float* __restrict__ w_ptr, float w_value) {
  run_thread<E, P, OP>(table, w_ptr, w_value, blockIdx.x, gridDim.x, threadIdx.x);
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

struct Pair {
  uintptr_t ema;
  uintptr_t param;
  int64_t numel;
};

// Cuts `pairs` into tables of up to kMaxTensors non-empty tensors and calls
// run(table, blocks) for each, with blocks = min(chunks in the table, max_blocks).
template <typename Run>
void for_each_table(const std::vector<Pair>& pairs, int64_t max_blocks, const Run& run) {
  TensorTable table{};
  int64_t chunks = 0;
  auto flush = [&]() {
    if (table.count == 0) return;
    table.first_chunk[table.count] = chunks;
    run(table, chunks < max_blocks ? chunks : max_blocks);
    table = TensorTable{};
    chunks = 0;
  };
  for (const Pair& pair : pairs) {
    if (pair.numel == 0) continue;
    table.ema[table.count] = pair.ema;
    table.param[table.count] = pair.param;
    table.numel[table.count] = pair.numel;
    table.first_chunk[table.count] = chunks;
    chunks += (pair.numel + kChunkElements - 1) / kChunkElements;
    if (++table.count == kMaxTensors) flush();
  }
  flush();
}

#ifdef SEMA_CUDA_HOST_EMULATION
int64_t emulated_max_blocks = 132 * kBlocksPerSm;  // an H100's; tests/test_cuda_emulated.py varies it

template <typename E, typename P, Op OP>
void launch(const char*, const std::vector<Pair>& pairs, const float* w_ptr, float w_value, int, cudaStream_t) {
  for_each_table(pairs, emulated_max_blocks, [&](const TensorTable& table, int64_t blocks) {
    for (int64_t block = 0; block < blocks; ++block) {
      for (unsigned thread = 0; thread < kThreads; ++thread) {
        run_thread<E, P, OP>(table, w_ptr, w_value, block, blocks, thread);
      }
    }
  });
}
#else
template <typename E, typename P, Op OP>
void launch(const char* op, const std::vector<Pair>& pairs, const float* w_ptr, float w_value, int device,
            cudaStream_t stream) {
  DeviceGuard guard(op, device);
  int sm_count = 0;
  SEMA_CUDA_CHECK(op, cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t max_blocks = static_cast<int64_t>(sm_count) * kBlocksPerSm;
  for_each_table(pairs, max_blocks, [&](const TensorTable& table, int64_t blocks) {
    ema_kernel<E, P, OP><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, w_ptr, w_value);
    SEMA_CUDA_CHECK(op, cudaGetLastError());
  });
}
#endif

template <Op OP>
void launch_update(const char* op, const std::vector<Pair>& pairs, int ema_dtype, int param_dtype, const float* w_ptr,
                   float w_value, int device, cudaStream_t stream) {
  if (ema_dtype == kFloat32 && param_dtype == kFloat32) {
    launch<Float32, Float32, OP>(op, pairs, w_ptr, w_value, device, stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16) {
    launch<Float32, BFloat16, OP>(op, pairs, w_ptr, w_value, device, stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kFloat16) {
    launch<Float32, Float16, OP>(op, pairs, w_ptr, w_value, device, stream);
  } else if (ema_dtype == kBFloat16 && param_dtype == kBFloat16) {
    launch<BFloat16, BFloat16, OP>(op, pairs, w_ptr, w_value, device, stream);
  } else if (ema_dtype == kFloat16 && param_dtype == kFloat16) {
    launch<Float16, Float16, OP>(op, pairs, w_ptr, w_value, device, stream);
  } else {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype pair");
  }
}

}  // namespace

// Entry points. bindings.cpp validated pointers, lengths, alignment and dtype codes.

void ema_update(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, float w_value,
                uintptr_t w_ptr, bool switch_param, int device, uintptr_t stream) {
  const std::vector<Pair> pairs{{ema, param, n}};
  const auto* w = reinterpret_cast<const float*>(w_ptr);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (switch_param) {
    launch_update<Op::kUpdateSwitch>("sema ema_update_(switch=True) [cuda]", pairs, ema_dtype, param_dtype, w, w_value,
                                     device, cuda_stream);
  } else {
    launch_update<Op::kUpdate>("sema ema_update_ [cuda]", pairs, ema_dtype, param_dtype, w, w_value, device,
                               cuda_stream);
  }
}

void ema_update_multi(const std::vector<uintptr_t>& emas, const std::vector<uintptr_t>& params,
                      const std::vector<int64_t>& numels, const std::vector<int>& ema_dtypes,
                      const std::vector<int>& param_dtypes, float w_value, uintptr_t w_ptr, bool switch_param,
                      int device, uintptr_t stream) {
  const char* op = switch_param ? "sema ema_update_multi_(switch=True) [cuda]" : "sema ema_update_multi_ [cuda]";
  const auto* w = reinterpret_cast<const float*>(w_ptr);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  // One launch (per kMaxTensors tensors) for each dtype pair present, in order of first use.
  std::vector<bool> done(emas.size(), false);
  for (size_t i = 0; i < emas.size(); ++i) {
    if (done[i]) continue;
    std::vector<Pair> group;
    for (size_t j = i; j < emas.size(); ++j) {
      if (!done[j] && ema_dtypes[j] == ema_dtypes[i] && param_dtypes[j] == param_dtypes[i]) {
        group.push_back({emas[j], params[j], numels[j]});
        done[j] = true;
      }
    }
    if (switch_param) {
      launch_update<Op::kUpdateSwitch>(op, group, ema_dtypes[i], param_dtypes[i], w, w_value, device, cuda_stream);
    } else {
      launch_update<Op::kUpdate>(op, group, ema_dtypes[i], param_dtypes[i], w, w_value, device, cuda_stream);
    }
  }
}

void switch_param(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, int device,
                  uintptr_t stream) {
  const char* op = "sema switch_ [cuda]";
  const std::vector<Pair> pairs{{ema, param, n}};
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (ema_dtype == param_dtype && ema_dtype == kFloat32) {
    launch<Word32, Word32, Op::kSwitch>(op, pairs, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == param_dtype) {
    launch<Word16, Word16, Op::kSwitch>(op, pairs, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16) {
    launch<Float32, BFloat16, Op::kSwitch>(op, pairs, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kFloat16) {
    launch<Float32, Float16, Op::kSwitch>(op, pairs, nullptr, 0.0f, device, cuda_stream);
  } else {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype pair");
  }
}

void swap(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, bool restore, int device,
          uintptr_t stream) {
  const char* op = restore ? "sema swap_(restore=True) [cuda]" : "sema swap_ [cuda]";
  const std::vector<Pair> pairs{{ema, param, n}};
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (ema_dtype == param_dtype && ema_dtype == kFloat32) {
    launch<Word32, Word32, Op::kExchange>(op, pairs, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == param_dtype) {
    launch<Word16, Word16, Op::kExchange>(op, pairs, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16 && restore) {
    launch<Word32, Word16, Op::kUnpack>(op, pairs, nullptr, 0.0f, device, cuda_stream);
  } else if (ema_dtype == kFloat32 && param_dtype == kBFloat16) {
    launch<Word32, Word16, Op::kPack>(op, pairs, nullptr, 0.0f, device, cuda_stream);
  } else {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype pair");
  }
}

#ifdef SEMA_CUDA_HOST_EMULATION
void set_emulated_max_blocks(int64_t blocks) { emulated_max_blocks = blocks; }
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
void sema_emulated_set_max_blocks(int64_t blocks) { sema::cuda::set_emulated_max_blocks(blocks); }

int sema_emulated_update(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, float w_value,
                         uintptr_t w_ptr, int switch_param, char* error, int64_t error_size) {
  return report(error, error_size, [&] {
    sema::cuda::ema_update(ema, param, n, ema_dtype, param_dtype, w_value, w_ptr, switch_param != 0, 0, 0);
  });
}

int sema_emulated_update_multi(const uintptr_t* emas, const uintptr_t* params, const int64_t* numels,
                               const int* ema_dtypes, const int* param_dtypes, int64_t count, float w_value,
                               uintptr_t w_ptr, int switch_param, char* error, int64_t error_size) {
  return report(error, error_size, [&] {
    sema::cuda::ema_update_multi({emas, emas + count}, {params, params + count}, {numels, numels + count},
                                 {ema_dtypes, ema_dtypes + count}, {param_dtypes, param_dtypes + count}, w_value,
                                 w_ptr, switch_param != 0, 0, 0);
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
}  // extern "C"
#endif  // SEMA_CUDA_HOST_EMULATION
