// The CUDA driver API, opened at run time from libcuda.so.1: the few types and entry points the
// loader uses, declared here so the module builds without cuda.h and links no CUDA library.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

namespace sageattn {

namespace cu {
// Types and enum values as cuda.h defines them; these have been ABI-stable since CUDA 4.
using Result = int;                     // CUresult; kSuccess is CUDA_SUCCESS
using Device = int;                     // CUdevice
using DevicePtr = unsigned long long;   // CUdeviceptr: 64-bit in the _v2 entry points used here
using Context = struct CUctx_st *;      // CUcontext
using Module = struct CUmod_st *;       // CUmodule
using Function = struct CUfunc_st *;    // CUfunction
using Stream = struct CUstream_st *;    // CUstream

constexpr Result kSuccess = 0;

// CUdevice_attribute
constexpr int kDeviceComputeCapabilityMajor = 75;
constexpr int kDeviceComputeCapabilityMinor = 76;

// CUfunction_attribute
constexpr int kFuncMaxThreadsPerBlock = 0;
constexpr int kFuncSharedSizeBytes = 1;  // static shared memory
constexpr int kFuncConstSizeBytes = 2;
constexpr int kFuncLocalSizeBytes = 3;   // local memory per thread: spills and stack
constexpr int kFuncNumRegs = 4;
constexpr int kFuncPtxVersion = 5;       // 10 * major + minor of the PTX the code came from
constexpr int kFuncBinaryVersion = 6;    // 10 * major + minor of the SASS that runs
constexpr int kFuncMaxDynamicSharedSizeBytes = 8;

// cuTensorMapEncodeTiled: CUtensorMap is 128 opaque bytes, 64-byte aligned; its enums are ints.
struct alignas(64) TensorMap {
  unsigned long long bits[16];
};

// cuLaunchKernelEx (CUDA 12.0): CUlaunchAttribute is an int id, padding to 8 bytes and a
// 64-byte value union; CUlaunchConfig the launch geometry, stream and attribute list.
constexpr int kLaunchAttributeProgrammaticStreamSerialization = 6;
struct LaunchAttribute {
  int id;
  char pad[4];
  union {
    char bytes[64];
    unsigned long long align;
    int programmatic_stream_serialization_allowed;
  } value;
};
struct LaunchConfig {
  unsigned grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_mem_bytes;
  Stream stream;
  LaunchAttribute *attrs;
  unsigned num_attrs;
};
static_assert(sizeof(LaunchAttribute) == 72 && sizeof(LaunchConfig) == 56, "cuda.h layouts");
}  // namespace cu

// Entry points, resolved by their exported names: cuda.h maps several API names onto `_v2`
// symbols (cuModuleGetGlobal -> cuModuleGetGlobal_v2, ...), and dlsym needs the real one.
struct DriverApi {
  cu::Result (*cuGetErrorName)(cu::Result, const char **);
  cu::Result (*cuGetErrorString)(cu::Result, const char **);
  cu::Result (*cuInit)(unsigned);
  cu::Result (*cuDriverGetVersion)(int *);
  cu::Result (*cuDeviceGetCount)(int *);
  cu::Result (*cuDeviceGet)(cu::Device *, int);
  cu::Result (*cuDeviceGetName)(char *, int, cu::Device);
  cu::Result (*cuDeviceGetAttribute)(int *, int, cu::Device);
  cu::Result (*cuDevicePrimaryCtxRetain)(cu::Context *, cu::Device);
  cu::Result (*cuCtxGetCurrent)(cu::Context *);
  cu::Result (*cuCtxPushCurrent)(cu::Context);    // cuCtxPushCurrent_v2
  cu::Result (*cuCtxPopCurrent)(cu::Context *);   // cuCtxPopCurrent_v2
  cu::Result (*cuModuleLoadData)(cu::Module *, const void *);
  cu::Result (*cuModuleGetFunction)(cu::Function *, cu::Module, const char *);
  cu::Result (*cuModuleGetGlobal)(cu::DevicePtr *, size_t *, cu::Module, const char *);  // _v2
  cu::Result (*cuMemcpyDtoH)(void *, cu::DevicePtr, size_t);                           // _v2
  cu::Result (*cuFuncGetAttribute)(int *, int, cu::Function);
  cu::Result (*cuFuncSetAttribute)(cu::Function, int, int);
  cu::Result (*cuLaunchKernel)(cu::Function, unsigned, unsigned, unsigned, unsigned, unsigned,
                               unsigned, unsigned, cu::Stream, void **, void **);
  // Optional (driver >= 12.4; null on older drivers): lets launch() check the params size.
  cu::Result (*cuFuncGetParamInfo)(cu::Function, size_t, size_t *, size_t *);
  // Optional (driver >= 12.0; null on older drivers): launch attributes (programmatic
  // dependent launch, sm_90+).
  cu::Result (*cuLaunchKernelEx)(const cu::LaunchConfig *, cu::Function, void **, void **);
  // Optional (driver >= 12.0; null on older drivers): tensor maps for the copy engine (sm_90+).
  cu::Result (*cuTensorMapEncodeTiled)(cu::TensorMap *, int dtype, unsigned rank, void *address,
                                       const unsigned long long *dims,
                                       const unsigned long long *strides, const unsigned *box,
                                       const unsigned *element_strides, int interleave,
                                       int swizzle, int l2_promotion, int oob_fill);
  int version;  // cuDriverGetVersion: 1000 * major + 10 * minor
};

// A failed driver call (or no driver); surfaces in Python as sageattn._ext.CudaError.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The driver, opened and cuInit-ed once per process (thread-safe). Throws CudaError naming
// `caller` when libcuda.so.1 cannot be opened, lacks an entry point, or cuInit fails.
const DriverApi &driver(const char *caller);

// (true, "CUDA driver 13.0 (libcuda.so.1)") or (false, why not). Never throws.
std::pair<bool, std::string> driver_status() noexcept;

// "CUDA_ERROR_NOT_FOUND (500): named symbol not found"
std::string describe_result(cu::Result result);

[[noreturn]] void throw_cuda_error(cu::Result result, const std::string &call);

// Throws CudaError("<call> failed: <name> (<code>): <text>"); `describe_call` builds the call's
// text (name and key arguments) only on failure, off the hot path.
template <typename DescribeCall>
inline void check(cu::Result result, DescribeCall &&describe_call) {
  if (result != cu::kSuccess) throw_cuda_error(result, describe_call());
}

}  // namespace sageattn
