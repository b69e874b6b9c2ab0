// pybind11 module sema._C: raw pointers (uintptr_t) + element counts + dtype codes, and a
// thread count (CPU) or a device index and stream handle (CUDA). No torch headers: the module
// builds on any machine with a C++ compiler and pybind11.
//
// Every check that protects memory runs here, before a pointer is touched, even though the
// Python side (sema/_ext_cpu.py, sema/_ext_cuda.py) checked the tensors already: a bad pointer
// is a crash, not an exception. Failed checks raise ValueError naming the op and argument.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

// The kernels, in ema_cpu.cpp (compiled once per instruction set) and ema_cuda.cu. The
// declarations are repeated here instead of in a header; a mismatch fails at link time
// because C++ names carry their parameter types.
namespace sema {
namespace cpu_baseline {
void ema_update(void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, float w, bool switch_param,
                int num_threads);
void switch_param(const void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, int num_threads);
void swap(void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, bool restore, int num_threads);
void ema_update_k(void* const* emas, int num_emas, void* param, int64_t n, int ema_dtype, int param_dtype,
                  const float* ws, int switch_index, int num_threads);
}  // namespace cpu_baseline
#ifdef SEMA_WITH_AVX2
namespace cpu_avx2 {
void ema_update(void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, float w, bool switch_param,
                int num_threads);
void switch_param(const void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, int num_threads);
void swap(void* ema, void* param, int64_t n, int ema_dtype, int param_dtype, bool restore, int num_threads);
void ema_update_k(void* const* emas, int num_emas, void* param, int64_t n, int ema_dtype, int param_dtype,
                  const float* ws, int switch_index, int num_threads);
}  // namespace cpu_avx2
#endif
#ifdef SEMA_WITH_CUDA
namespace cuda {
void ema_update(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, float w_value,
                uintptr_t w_ptr, bool switch_param, int device, uintptr_t stream);
std::vector<int64_t> plan_update_multi(const std::vector<uintptr_t>& emas, const std::vector<uintptr_t>& params,
                                       const std::vector<int64_t>& numels, int ema_dtype, int param_dtype,
                                       int device);
void ema_update_multi_pieces(uintptr_t pieces, int64_t count, int ema_dtype, int param_dtype, float w_value,
                             uintptr_t w_ptr, bool switch_param, int device, uintptr_t stream);
void ema_update_k(const std::vector<uintptr_t>& emas, uintptr_t param, int64_t n, int ema_dtype, int param_dtype,
                  uintptr_t ws_ptr, int switch_index, int device, uintptr_t stream);
std::vector<int64_t> plan_update_k_multi(const std::vector<std::vector<uintptr_t>>& emas,
                                         const std::vector<uintptr_t>& params, const std::vector<int64_t>& numels,
                                         int ema_dtype, int param_dtype, int device);
void ema_update_k_multi_pieces(uintptr_t pieces, int64_t count, int num_emas, int ema_dtype, int param_dtype,
                               uintptr_t ws_ptr, int switch_index, int device, uintptr_t stream);
void switch_param(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, int device,
                  uintptr_t stream);
void swap(uintptr_t ema, uintptr_t param, int64_t n, int ema_dtype, int param_dtype, bool restore, int device,
          uintptr_t stream);
std::string probe(int device);
std::string compiled_archs();
int ptx_arch();
std::string nvcc_version();
int runtime_version();
int driver_version();
}  // namespace cuda
#endif
}  // namespace sema

namespace {

// Bumped whenever a signature below changes, so that a stale build is reported, not called.
constexpr int kInterfaceVersion = 3;

constexpr int kFloat32 = 0;
constexpr int kBFloat16 = 1;
constexpr int kFloat16 = 2;

#ifndef SEMA_VERSION
#define SEMA_VERSION "unknown"
#endif

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

#define SEMA_CHECK(op, condition, ...)                                              \
  do {                                                                              \
    if (!(condition)) throw std::invalid_argument(concat("sema._C.", op, ": ", __VA_ARGS__)); \
  } while (0)

#define SEMA_CHECK_DTYPE(op, name, code)                                                                        \
  SEMA_CHECK(op, (code) == kFloat32 || (code) == kBFloat16 || (code) == kFloat16, name, " dtype code ", code, \
             " is not 0 (float32), 1 (bfloat16) or 2 (float16)")

#define SEMA_CHECK_DTYPE_PAIR(op, ema_dtype, param_dtype)                                                 \
  SEMA_CHECK(op, (ema_dtype) == kFloat32 || (ema_dtype) == (param_dtype), "ema dtype code ", ema_dtype, \
             " does not fit param dtype code ", param_dtype, "; the EMA must be float32 or the param dtype")

#define SEMA_CHECK_BUFFER(op, name, ptr, numel, element_size)                                                     \
  SEMA_CHECK(op, (numel) == 0 || (ptr) != 0, name, " is a null pointer");                                         \
  SEMA_CHECK(op, (ptr) % (element_size) == 0, name, " address ", ptr, " is not aligned to its ", element_size,   \
             "-byte elements");                                                                                   \
  SEMA_CHECK(op, (ptr) <= std::numeric_limits<uintptr_t>::max() - static_cast<uintptr_t>(numel) * (element_size), \
             name, " address range wraps around")

#define SEMA_CHECK_DISJOINT(op, a, a_bytes, b, b_bytes) \
  SEMA_CHECK(op, (a_bytes) == 0 || (b_bytes) == 0 || (a) + (a_bytes) <= (b) || (b) + (b_bytes) <= (a), \
             "ema and param share memory; they must be separate buffers")

int element_size(int code) { return code == kFloat32 ? 4 : 2; }

// The checks every pair of buffers passes before any kernel sees it.
void check_pair(const char* op, uintptr_t ema, uintptr_t param, int64_t numel, int ema_dtype, int param_dtype) {
  SEMA_CHECK_DTYPE(op, "ema", ema_dtype);
  SEMA_CHECK_DTYPE(op, "param", param_dtype);
  SEMA_CHECK_DTYPE_PAIR(op, ema_dtype, param_dtype);
  SEMA_CHECK(op, numel >= 0, "numel ", numel, " is negative");
  SEMA_CHECK(op, numel <= std::numeric_limits<int64_t>::max() / 8, "numel ", numel, " is too large");
  const uintptr_t ema_bytes = static_cast<uintptr_t>(numel) * element_size(ema_dtype);
  const uintptr_t param_bytes = static_cast<uintptr_t>(numel) * element_size(param_dtype);
  SEMA_CHECK_BUFFER(op, "ema", ema, numel, static_cast<uintptr_t>(element_size(ema_dtype)));
  SEMA_CHECK_BUFFER(op, "param", param, numel, static_cast<uintptr_t>(element_size(param_dtype)));
  SEMA_CHECK_DISJOINT(op, ema, ema_bytes, param, param_bytes);
}

// The K EMAs of one param: every (EMA, param) pair as check_pair, and no two EMAs sharing memory.
void check_emas(const char* op, const std::vector<uintptr_t>& emas, uintptr_t param, int64_t numel, int ema_dtype,
                int param_dtype) {
  SEMA_CHECK(op, !emas.empty(), "no EMAs; pass at least one");
  for (const uintptr_t ema : emas) check_pair(op, ema, param, numel, ema_dtype, param_dtype);
  const uintptr_t bytes = static_cast<uintptr_t>(numel) * element_size(ema_dtype);
  for (size_t i = 0; i < emas.size(); ++i) {
    for (size_t j = i + 1; j < emas.size(); ++j) {
      SEMA_CHECK(op, bytes == 0 || emas[i] + bytes <= emas[j] || emas[j] + bytes <= emas[i], "EMAs ", i, " and ", j,
                 " share memory; they must be separate buffers");
    }
  }
}

void check_switch_index(const char* op, int switch_index, size_t num_emas) {
  SEMA_CHECK(op, switch_index >= -1 && switch_index < static_cast<int64_t>(num_emas), "switch_index ", switch_index,
             " is outside [-1, ", num_emas, ")");
}

void check_swap_dtypes(const char* op, int ema_dtype, int param_dtype) {
  SEMA_CHECK(op, ema_dtype == param_dtype || param_dtype == kBFloat16,
             "no lossless in-place swap between a float32 EMA and float16 params");
}

// --- CPU ------------------------------------------------------------------------------------

enum class CpuIsa { kBaseline, kAvx2 };

bool cpu_supports_avx2() {
#if defined(SEMA_WITH_AVX2) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

CpuIsa g_cpu_isa = cpu_supports_avx2() ? CpuIsa::kAvx2 : CpuIsa::kBaseline;

const char* isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "baseline"; }

std::string cpu_isa() { return isa_name(g_cpu_isa); }

// Chooses the CPU kernels: "avx2" (AVX2 + FMA + F16C; fp32 lerp with fma, as PyTorch's AVX2
// and AVX-512 kernels) or "baseline" (x86-64 SSE2; lerp without fma, as PyTorch's DEFAULT
// kernels). Returns the previous choice.
std::string set_cpu_isa(const std::string& name) {
  const std::string previous = cpu_isa();
  if (name == "baseline") {
    g_cpu_isa = CpuIsa::kBaseline;
  } else if (name == "avx2") {
    SEMA_CHECK("set_cpu_isa", cpu_supports_avx2(), "this CPU or build has no AVX2 + FMA + F16C kernels");
    g_cpu_isa = CpuIsa::kAvx2;
  } else {
    SEMA_CHECK("set_cpu_isa", false, "unknown instruction set '", name, "'; use 'avx2' or 'baseline'");
  }
  return previous;
}

void check_threads(const char* op, int num_threads) {
  SEMA_CHECK(op, num_threads >= 1, "num_threads ", num_threads, " must be >= 1");
}

void cpu_ema_update(uintptr_t ema, uintptr_t param, int64_t numel, int ema_dtype, int param_dtype, float w,
                    bool switch_param, int num_threads) {
  const char* op = "cpu_ema_update";
  check_pair(op, ema, param, numel, ema_dtype, param_dtype);
  check_threads(op, num_threads);
  auto* e = reinterpret_cast<void*>(ema);
  auto* p = reinterpret_cast<void*>(param);
#ifdef SEMA_WITH_AVX2
  if (g_cpu_isa == CpuIsa::kAvx2) {
    sema::cpu_avx2::ema_update(e, p, numel, ema_dtype, param_dtype, w, switch_param, num_threads);
    return;
  }
#endif
  sema::cpu_baseline::ema_update(e, p, numel, ema_dtype, param_dtype, w, switch_param, num_threads);
}

void cpu_ema_update_multi(const std::vector<uintptr_t>& emas, const std::vector<uintptr_t>& params,
                          const std::vector<int64_t>& numels, const std::vector<int>& ema_dtypes,
                          const std::vector<int>& param_dtypes, float w, bool switch_param, int num_threads) {
  const char* op = "cpu_ema_update_multi";
  const size_t count = emas.size();
  SEMA_CHECK(op, params.size() == count && numels.size() == count && ema_dtypes.size() == count &&
                     param_dtypes.size() == count,
             "the five lists must have one entry per tensor pair");
  for (size_t i = 0; i < count; ++i) check_pair(op, emas[i], params[i], numels[i], ema_dtypes[i], param_dtypes[i]);
  check_threads(op, num_threads);
  for (size_t i = 0; i < count; ++i) {
    cpu_ema_update(emas[i], params[i], numels[i], ema_dtypes[i], param_dtypes[i], w, switch_param, num_threads);
  }
}

// K EMAs of one param in one pass over it; ws: the K weights; switch_index -1 or in [0, K).
void cpu_ema_update_k(const std::vector<uintptr_t>& emas, uintptr_t param, int64_t numel, int ema_dtype,
                      int param_dtype, const std::vector<float>& ws, int switch_index, int num_threads) {
  const char* op = "cpu_ema_update_k";
  check_emas(op, emas, param, numel, ema_dtype, param_dtype);
  SEMA_CHECK(op, ws.size() == emas.size(), ws.size(), " weights for ", emas.size(), " EMAs; pass one per EMA");
  check_switch_index(op, switch_index, emas.size());
  check_threads(op, num_threads);
  std::vector<void*> pointers;
  for (const uintptr_t ema : emas) pointers.push_back(reinterpret_cast<void*>(ema));
  const int num_emas = static_cast<int>(pointers.size());
  auto* p = reinterpret_cast<void*>(param);
#ifdef SEMA_WITH_AVX2
  if (g_cpu_isa == CpuIsa::kAvx2) {
    sema::cpu_avx2::ema_update_k(pointers.data(), num_emas, p, numel, ema_dtype, param_dtype, ws.data(), switch_index,
                                 num_threads);
    return;
  }
#endif
  sema::cpu_baseline::ema_update_k(pointers.data(), num_emas, p, numel, ema_dtype, param_dtype, ws.data(),
                                   switch_index, num_threads);
}

// emas[k][i] is EMA k of tensor i; every tensor checked before the first is updated.
void cpu_ema_update_k_multi(const std::vector<std::vector<uintptr_t>>& emas, const std::vector<uintptr_t>& params,
                            const std::vector<int64_t>& numels, const std::vector<int>& ema_dtypes,
                            const std::vector<int>& param_dtypes, const std::vector<float>& ws, int switch_index,
                            int num_threads) {
  const char* op = "cpu_ema_update_k_multi";
  const size_t count = params.size();
  SEMA_CHECK(op, !emas.empty(), "no EMAs; pass at least one");
  SEMA_CHECK(op, numels.size() == count && ema_dtypes.size() == count && param_dtypes.size() == count,
             "the param, numel and dtype lists must have one entry per tensor");
  for (const std::vector<uintptr_t>& row : emas) {
    SEMA_CHECK(op, row.size() == count, "every EMA list must have one entry per tensor");
  }
  SEMA_CHECK(op, ws.size() == emas.size(), ws.size(), " weights for ", emas.size(), " EMAs; pass one per EMA");
  check_switch_index(op, switch_index, emas.size());
  check_threads(op, num_threads);
  std::vector<std::vector<uintptr_t>> columns(count);
  for (size_t i = 0; i < count; ++i) {
    for (const std::vector<uintptr_t>& row : emas) columns[i].push_back(row[i]);
    check_emas(op, columns[i], params[i], numels[i], ema_dtypes[i], param_dtypes[i]);
  }
  for (size_t i = 0; i < count; ++i) {
    cpu_ema_update_k(columns[i], params[i], numels[i], ema_dtypes[i], param_dtypes[i], ws, switch_index, num_threads);
  }
}

void cpu_switch(uintptr_t ema, uintptr_t param, int64_t numel, int ema_dtype, int param_dtype, int num_threads) {
  const char* op = "cpu_switch";
  check_pair(op, ema, param, numel, ema_dtype, param_dtype);
  check_threads(op, num_threads);
  const auto* e = reinterpret_cast<const void*>(ema);
  auto* p = reinterpret_cast<void*>(param);
#ifdef SEMA_WITH_AVX2
  if (g_cpu_isa == CpuIsa::kAvx2) {
    sema::cpu_avx2::switch_param(e, p, numel, ema_dtype, param_dtype, num_threads);
    return;
  }
#endif
  sema::cpu_baseline::switch_param(e, p, numel, ema_dtype, param_dtype, num_threads);
}

void cpu_swap(uintptr_t ema, uintptr_t param, int64_t numel, int ema_dtype, int param_dtype, bool restore,
              int num_threads) {
  const char* op = "cpu_swap";
  check_pair(op, ema, param, numel, ema_dtype, param_dtype);
  check_swap_dtypes(op, ema_dtype, param_dtype);
  check_threads(op, num_threads);
  auto* e = reinterpret_cast<void*>(ema);
  auto* p = reinterpret_cast<void*>(param);
#ifdef SEMA_WITH_AVX2
  if (g_cpu_isa == CpuIsa::kAvx2) {
    sema::cpu_avx2::swap(e, p, numel, ema_dtype, param_dtype, restore, num_threads);
    return;
  }
#endif
  sema::cpu_baseline::swap(e, p, numel, ema_dtype, param_dtype, restore, num_threads);
}

// --- CUDA -----------------------------------------------------------------------------------

#ifdef SEMA_WITH_CUDA
void check_device(const char* op, int device) { SEMA_CHECK(op, device >= 0, "device index ", device, " is negative"); }

void check_weight_pointer(const char* op, uintptr_t w_ptr) {
  SEMA_CHECK(op, w_ptr % 4 == 0, "w pointer ", w_ptr, " is not aligned to 4 bytes");
}

void cuda_ema_update(uintptr_t ema, uintptr_t param, int64_t numel, int ema_dtype, int param_dtype, float w_value,
                     uintptr_t w_ptr, bool switch_param, int device, uintptr_t stream) {
  const char* op = "cuda_ema_update";
  check_pair(op, ema, param, numel, ema_dtype, param_dtype);
  check_weight_pointer(op, w_ptr);
  check_device(op, device);
  sema::cuda::ema_update(ema, param, numel, ema_dtype, param_dtype, w_value, w_ptr, switch_param, device, stream);
}

// The piece table of a multi-tensor update of one dtype pair (int64 triples: ema address,
// param address, element count), after the checks of every pair. Its addresses are the
// validated buffers' and nothing else, so the launch below, given a device copy of it, touches
// only memory checked here.
std::vector<int64_t> cuda_plan_update_multi(const std::vector<uintptr_t>& emas, const std::vector<uintptr_t>& params,
                                            const std::vector<int64_t>& numels, int ema_dtype, int param_dtype,
                                            int device) {
  const char* op = "cuda_plan_update_multi";
  const size_t count = emas.size();
  SEMA_CHECK(op, params.size() == count && numels.size() == count,
             "the three lists must have one entry per tensor pair");
  for (size_t i = 0; i < count; ++i) check_pair(op, emas[i], params[i], numels[i], ema_dtype, param_dtype);
  check_device(op, device);
  return sema::cuda::plan_update_multi(emas, params, numels, ema_dtype, param_dtype, device);
}

// One launch over `count` pieces at `pieces`: a device copy of a cuda_plan_update_multi table
// for the same dtype pair and device (sema/_ext_cuda.py keeps them together).
void cuda_ema_update_multi_pieces(uintptr_t pieces, int64_t count, int ema_dtype, int param_dtype, float w_value,
                                  uintptr_t w_ptr, bool switch_param, int device, uintptr_t stream) {
  const char* op = "cuda_ema_update_multi_pieces";
  SEMA_CHECK_DTYPE(op, "ema", ema_dtype);
  SEMA_CHECK_DTYPE(op, "param", param_dtype);
  SEMA_CHECK_DTYPE_PAIR(op, ema_dtype, param_dtype);
  SEMA_CHECK(op, count >= 0 && count <= std::numeric_limits<int32_t>::max(), "piece count ", count,
             " is outside [0, 2**31)");
  SEMA_CHECK(op, count == 0 || (pieces != 0 && pieces % 8 == 0), "piece table address ", pieces,
             " is null or not aligned to 8 bytes");
  check_weight_pointer(op, w_ptr);
  check_device(op, device);
  sema::cuda::ema_update_multi_pieces(pieces, count, ema_dtype, param_dtype, w_value, w_ptr, switch_param, device,
                                      stream);
}

constexpr size_t kMaxEmasPerPass = 8;  // kMaxEmas in ema_cuda.cu

void check_weights_pointer(const char* op, uintptr_t ws_ptr) {
  SEMA_CHECK(op, ws_ptr != 0 && ws_ptr % 4 == 0, "ws pointer ", ws_ptr, " is null or not aligned to 4 bytes");
}

void check_emas_per_pass(const char* op, size_t num_emas) {
  SEMA_CHECK(op, num_emas >= 1 && num_emas <= kMaxEmasPerPass, num_emas, " EMAs; one pass takes 1 to ",
             kMaxEmasPerPass, " (split larger sets into passes)");
}

// K <= 8 EMAs of one param in one launch; ws_ptr: K fp32 weights on the device.
void cuda_ema_update_k(const std::vector<uintptr_t>& emas, uintptr_t param, int64_t numel, int ema_dtype,
                       int param_dtype, uintptr_t ws_ptr, int switch_index, int device, uintptr_t stream) {
  const char* op = "cuda_ema_update_k";
  check_emas_per_pass(op, emas.size());
  check_emas(op, emas, param, numel, ema_dtype, param_dtype);
  check_weights_pointer(op, ws_ptr);
  check_switch_index(op, switch_index, emas.size());
  check_device(op, device);
  sema::cuda::ema_update_k(emas, param, numel, ema_dtype, param_dtype, ws_ptr, switch_index, device, stream);
}

// The K-EMA piece table of one dtype pair (rows of K + 2 int64: param address, count, K EMA
// addresses), after the checks of every tensor's K EMAs and param. emas[k][i]: EMA k of tensor i.
std::vector<int64_t> cuda_plan_update_k_multi(const std::vector<std::vector<uintptr_t>>& emas,
                                              const std::vector<uintptr_t>& params,
                                              const std::vector<int64_t>& numels, int ema_dtype, int param_dtype,
                                              int device) {
  const char* op = "cuda_plan_update_k_multi";
  check_emas_per_pass(op, emas.size());
  const size_t count = params.size();
  SEMA_CHECK(op, numels.size() == count, "the param and numel lists must have one entry per tensor");
  for (const std::vector<uintptr_t>& row : emas) {
    SEMA_CHECK(op, row.size() == count, "every EMA list must have one entry per tensor");
  }
  for (size_t i = 0; i < count; ++i) {
    std::vector<uintptr_t> column;
    for (const std::vector<uintptr_t>& row : emas) column.push_back(row[i]);
    check_emas(op, column, params[i], numels[i], ema_dtype, param_dtype);
  }
  check_device(op, device);
  return sema::cuda::plan_update_k_multi(emas, params, numels, ema_dtype, param_dtype, device);
}

// One launch over `count` rows at `pieces`: a device copy of a cuda_plan_update_k_multi table
// for the same EMA count, dtype pair and device (sema/_ext_cuda.py keeps them together).
void cuda_ema_update_k_multi_pieces(uintptr_t pieces, int64_t count, int num_emas, int ema_dtype, int param_dtype,
                                    uintptr_t ws_ptr, int switch_index, int device, uintptr_t stream) {
  const char* op = "cuda_ema_update_k_multi_pieces";
  check_emas_per_pass(op, static_cast<size_t>(num_emas < 0 ? 0 : num_emas));
  SEMA_CHECK_DTYPE(op, "ema", ema_dtype);
  SEMA_CHECK_DTYPE(op, "param", param_dtype);
  SEMA_CHECK_DTYPE_PAIR(op, ema_dtype, param_dtype);
  SEMA_CHECK(op, count >= 0 && count <= std::numeric_limits<int32_t>::max(), "piece count ", count,
             " is outside [0, 2**31)");
  SEMA_CHECK(op, count == 0 || (pieces != 0 && pieces % 8 == 0), "piece table address ", pieces,
             " is null or not aligned to 8 bytes");
  check_weights_pointer(op, ws_ptr);
  check_switch_index(op, switch_index, static_cast<size_t>(num_emas));
  check_device(op, device);
  sema::cuda::ema_update_k_multi_pieces(pieces, count, num_emas, ema_dtype, param_dtype, ws_ptr, switch_index, device,
                                        stream);
}

void cuda_switch(uintptr_t ema, uintptr_t param, int64_t numel, int ema_dtype, int param_dtype, int device,
                 uintptr_t stream) {
  const char* op = "cuda_switch";
  check_pair(op, ema, param, numel, ema_dtype, param_dtype);
  check_device(op, device);
  sema::cuda::switch_param(ema, param, numel, ema_dtype, param_dtype, device, stream);
}

void cuda_swap(uintptr_t ema, uintptr_t param, int64_t numel, int ema_dtype, int param_dtype, bool restore,
               int device, uintptr_t stream) {
  const char* op = "cuda_swap";
  check_pair(op, ema, param, numel, ema_dtype, param_dtype);
  check_swap_dtypes(op, ema_dtype, param_dtype);
  check_device(op, device);
  sema::cuda::swap(ema, param, numel, ema_dtype, param_dtype, restore, device, stream);
}
#endif

std::string host_compiler() {
#if defined(__clang__)
  return concat("clang ", __clang_major__, ".", __clang_minor__, ".", __clang_patchlevel__);
#elif defined(__GNUC__)
  return concat("gcc ", __GNUC__, ".", __GNUC_MINOR__, ".", __GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["version"] = SEMA_VERSION;
  info["interface_version"] = kInterfaceVersion;
  info["compiler"] = host_compiler();
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = py::none();
#endif
#ifdef SEMA_WITH_AVX2
  info["cpu_kernels"] = py::make_tuple("baseline", "avx2");
#else
  info["cpu_kernels"] = py::make_tuple("baseline");
#endif
  info["cpu_isa"] = cpu_isa();
#ifdef SEMA_WITH_CUDA
  info["cuda"] = true;
  info["nvcc"] = sema::cuda::nvcc_version();
  py::list archs;
  std::stringstream list(sema::cuda::compiled_archs());  // "800,900": nvcc's __CUDA_ARCH_LIST__
  for (std::string arch; std::getline(list, arch, ',');) archs.append(concat("sm_", std::stoi(arch) / 10));
  info["cuda_archs"] = archs;
  info["cuda_ptx"] = sema::cuda::ptx_arch() ? py::object(py::str(concat("compute_", sema::cuda::ptx_arch())))
                                            : py::object(py::none());
  info["cuda_runtime"] = sema::cuda::runtime_version();
  info["cuda_skipped"] = py::none();
#else
  info["cuda"] = false;
  info["cuda_archs"] = py::list();
#ifdef SEMA_CUDA_SKIPPED
  info["cuda_skipped"] = SEMA_CUDA_SKIPPED;  // a string literal from setup.py
#else
  info["cuda_skipped"] = "not requested";
#endif
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sema's compiled kernels (raw pointers; call them through sema.ops, which checks the tensors)";
  m.attr("INTERFACE_VERSION") = kInterfaceVersion;
  m.attr("FLOAT32") = kFloat32;
  m.attr("BFLOAT16") = kBFloat16;
  m.attr("FLOAT16") = kFloat16;
  m.def("build_info", &build_info, "Build metadata: version, compiler, CPU kernels, CUDA archs.");
  m.def("cpu_isa", &cpu_isa, "The CPU kernels in use: 'avx2' or 'baseline'.");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"), "Choose 'avx2' or 'baseline' CPU kernels; returns the previous.");

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("cpu_ema_update", &cpu_ema_update, py::arg("ema_ptr"), py::arg("param_ptr"), py::arg("numel"),
        py::arg("ema_dtype"), py::arg("param_dtype"), py::arg("w"), py::arg("switch_param"), py::arg("num_threads"),
        release);
  m.def("cpu_ema_update_multi", &cpu_ema_update_multi, py::arg("ema_ptrs"), py::arg("param_ptrs"), py::arg("numels"),
        py::arg("ema_dtypes"), py::arg("param_dtypes"), py::arg("w"), py::arg("switch_param"), py::arg("num_threads"),
        release);
  m.def("cpu_ema_update_k", &cpu_ema_update_k, py::arg("ema_ptrs"), py::arg("param_ptr"), py::arg("numel"),
        py::arg("ema_dtype"), py::arg("param_dtype"), py::arg("ws"), py::arg("switch_index"), py::arg("num_threads"),
        release);
  m.def("cpu_ema_update_k_multi", &cpu_ema_update_k_multi, py::arg("ema_ptrs"), py::arg("param_ptrs"),
        py::arg("numels"), py::arg("ema_dtypes"), py::arg("param_dtypes"), py::arg("ws"), py::arg("switch_index"),
        py::arg("num_threads"), release);
  m.def("cpu_switch", &cpu_switch, py::arg("ema_ptr"), py::arg("param_ptr"), py::arg("numel"), py::arg("ema_dtype"),
        py::arg("param_dtype"), py::arg("num_threads"), release);
  m.def("cpu_swap", &cpu_swap, py::arg("ema_ptr"), py::arg("param_ptr"), py::arg("numel"), py::arg("ema_dtype"),
        py::arg("param_dtype"), py::arg("restore"), py::arg("num_threads"), release);
#ifdef SEMA_WITH_CUDA
  m.def("cuda_ema_update", &cuda_ema_update, py::arg("ema_ptr"), py::arg("param_ptr"), py::arg("numel"),
        py::arg("ema_dtype"), py::arg("param_dtype"), py::arg("w_value"), py::arg("w_ptr"), py::arg("switch_param"),
        py::arg("device"), py::arg("stream"), release);
  m.def("cuda_plan_update_multi", &cuda_plan_update_multi, py::arg("ema_ptrs"), py::arg("param_ptrs"),
        py::arg("numels"), py::arg("ema_dtype"), py::arg("param_dtype"), py::arg("device"), release);
  m.def("cuda_ema_update_multi_pieces", &cuda_ema_update_multi_pieces, py::arg("pieces_ptr"), py::arg("count"),
        py::arg("ema_dtype"), py::arg("param_dtype"), py::arg("w_value"), py::arg("w_ptr"), py::arg("switch_param"),
        py::arg("device"), py::arg("stream"), release);
  m.def("cuda_ema_update_k", &cuda_ema_update_k, py::arg("ema_ptrs"), py::arg("param_ptr"), py::arg("numel"),
        py::arg("ema_dtype"), py::arg("param_dtype"), py::arg("ws_ptr"), py::arg("switch_index"), py::arg("device"),
        py::arg("stream"), release);
  m.def("cuda_plan_update_k_multi", &cuda_plan_update_k_multi, py::arg("ema_ptrs"), py::arg("param_ptrs"),
        py::arg("numels"), py::arg("ema_dtype"), py::arg("param_dtype"), py::arg("device"), release);
  m.def("cuda_ema_update_k_multi_pieces", &cuda_ema_update_k_multi_pieces, py::arg("pieces_ptr"), py::arg("count"),
        py::arg("num_emas"), py::arg("ema_dtype"), py::arg("param_dtype"), py::arg("ws_ptr"), py::arg("switch_index"),
        py::arg("device"), py::arg("stream"), release);
  m.def("cuda_switch", &cuda_switch, py::arg("ema_ptr"), py::arg("param_ptr"), py::arg("numel"), py::arg("ema_dtype"),
        py::arg("param_dtype"), py::arg("device"), py::arg("stream"), release);
  m.def("cuda_swap", &cuda_swap, py::arg("ema_ptr"), py::arg("param_ptr"), py::arg("numel"), py::arg("ema_dtype"),
        py::arg("param_dtype"), py::arg("restore"), py::arg("device"), py::arg("stream"), release);
  m.def("cuda_probe", &sema::cuda::probe, py::arg("device"),
        "'' when the CUDA kernels can run on the device, else the reason they cannot.", release);
  m.def("cuda_driver_version", &sema::cuda::driver_version, "cudaDriverGetVersion(), 0 without a driver.");
#endif
}
