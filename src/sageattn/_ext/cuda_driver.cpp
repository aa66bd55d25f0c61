#include "cuda_driver.h"

#include <dlfcn.h>

#include <cstdlib>

namespace sageattn {
namespace {

// SAGEATTN_LIBCUDA_PATH replaces the library name: a driver outside the loader's search path
// (some container and Nix setups), or, in tests, a path that does not exist.
const char *library_name() {
  const char *path = std::getenv("SAGEATTN_LIBCUDA_PATH");
  return (path != nullptr && *path != '\0') ? path : "libcuda.so.1";
}

struct Loaded {
  DriverApi api{};
  std::string error;  // empty: the driver is usable
  std::string status;
};

std::string describe(const DriverApi &api, cu::Result result) {
  const char *err_name = nullptr;
  const char *err_text = nullptr;
  if (api.cuGetErrorName != nullptr) api.cuGetErrorName(result, &err_name);
  if (api.cuGetErrorString != nullptr) api.cuGetErrorString(result, &err_text);
  return std::string(err_name ? err_name : "CUDA_ERROR_?") + " (" + std::to_string(result) +
         "): " + (err_text ? err_text : "unknown error");
}

template <typename Fn>
bool resolve(void *lib, Fn &fn, const char *symbol, std::string &missing) {
  fn = reinterpret_cast<Fn>(dlsym(lib, symbol));
  if (fn == nullptr && missing.empty()) missing = symbol;
  return fn != nullptr;
}

Loaded load() {
  Loaded out;
  const std::string name = library_name();
  // RTLD_LOCAL: the driver's symbols stay out of the global namespace of the process.
  void *lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char *why = dlerror();
    // dlerror() names the file: "libcuda.so.1: cannot open shared object file: ..."
    out.error = std::string("cannot load the CUDA driver: ") + (why ? why : name.c_str()) +
                " (no NVIDIA driver is installed, or its library is not on the loader's path)";
    return out;
  }
  DriverApi &a = out.api;
  std::string missing;
  resolve(lib, a.cuGetErrorName, "cuGetErrorName", missing);
  resolve(lib, a.cuGetErrorString, "cuGetErrorString", missing);
  resolve(lib, a.cuInit, "cuInit", missing);
  resolve(lib, a.cuDriverGetVersion, "cuDriverGetVersion", missing);
  resolve(lib, a.cuDeviceGetCount, "cuDeviceGetCount", missing);
  resolve(lib, a.cuDeviceGet, "cuDeviceGet", missing);
  resolve(lib, a.cuDeviceGetName, "cuDeviceGetName", missing);
  resolve(lib, a.cuDeviceGetAttribute, "cuDeviceGetAttribute", missing);
  resolve(lib, a.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", missing);
  resolve(lib, a.cuCtxGetCurrent, "cuCtxGetCurrent", missing);
  resolve(lib, a.cuCtxPushCurrent, "cuCtxPushCurrent_v2", missing);
  resolve(lib, a.cuCtxPopCurrent, "cuCtxPopCurrent_v2", missing);
  resolve(lib, a.cuModuleLoadData, "cuModuleLoadData", missing);
  resolve(lib, a.cuModuleGetFunction, "cuModuleGetFunction", missing);
  resolve(lib, a.cuModuleGetGlobal, "cuModuleGetGlobal_v2", missing);
  resolve(lib, a.cuMemcpyDtoH, "cuMemcpyDtoH_v2", missing);
  resolve(lib, a.cuFuncGetAttribute, "cuFuncGetAttribute", missing);
  resolve(lib, a.cuFuncSetAttribute, "cuFuncSetAttribute", missing);
  resolve(lib, a.cuLaunchKernel, "cuLaunchKernel", missing);
  if (!missing.empty()) {
    out.error = name + " has no entry point " + missing + ": the NVIDIA driver is too old";
    return out;
  }
  std::string optional;
  resolve(lib, a.cuFuncGetParamInfo, "cuFuncGetParamInfo", optional);
  resolve(lib, a.cuTensorMapEncodeTiled, "cuTensorMapEncodeTiled", optional);
  resolve(lib, a.cuLaunchKernelEx, "cuLaunchKernelEx", optional);

  cu::Result r = a.cuInit(0);
  if (r != cu::kSuccess) {
    out.error = "cuInit(0) failed: " + describe(a, r);
    return out;
  }
  r = a.cuDriverGetVersion(&a.version);
  if (r != cu::kSuccess) a.version = 0;
  out.status = "CUDA driver " + std::to_string(a.version / 1000) + "." +
               std::to_string(a.version % 1000 / 10) + " (" + name + ")";
  return out;
}

const Loaded &loaded() {
  static const Loaded instance = load();  // thread-safe one-time initialization (C++11)
  return instance;
}

}  // namespace

const DriverApi &driver(const char *caller) {
  const Loaded &l = loaded();
  if (!l.error.empty()) throw CudaError(std::string(caller) + ": " + l.error);
  return l.api;
}

std::pair<bool, std::string> driver_status() noexcept {
  try {
    const Loaded &l = loaded();
    if (!l.error.empty()) return {false, l.error};
    return {true, l.status};
  } catch (...) {  // allocation failure while building a message: still never throw
    return {false, "driver status unavailable"};
  }
}

std::string describe_result(cu::Result result) { return describe(loaded().api, result); }

void throw_cuda_error(cu::Result result, const std::string &call) {
  throw CudaError(call + " failed: " + describe_result(result));
}

}  // namespace sageattn
