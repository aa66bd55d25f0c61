// sageattn._ext: a generic "load a fatbin, find a kernel, launch it" layer over the CUDA driver
// API. Integers in (handles, pointers, stream), nothing attention-specific; docs/ARCHITECTURE.md
// fixes this interface.
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_driver.h"

namespace nb = nanobind;
using namespace sageattn;

namespace {

using Dim3 = std::array<unsigned, 3>;

struct ModuleInfo {
  int ordinal;
  cu::Context ctx;
};

struct FunctionInfo {
  int ordinal;
  cu::Context ctx;
  std::string name;
  size_t param_bytes;  // size of the kernel's one parameter; 0 where the driver cannot tell
};

// Handles this module gave out. Python passes them back as plain integers, so each is checked
// against these tables: a stale or foreign integer raises ValueError instead of crashing.
std::mutex g_mutex;
std::unordered_map<int, cu::Context> g_primary;  // ordinal -> retained primary context
std::unordered_map<uintptr_t, ModuleInfo> g_modules;
std::unordered_map<uintptr_t, FunctionInfo> g_functions;

std::string hex(uintptr_t v) {
  char buf[2 + 2 * sizeof(uintptr_t) + 1];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string dims(const Dim3 &d) {
  return "(" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + ", " + std::to_string(d[2]) + ")";
}

cu::Device device(const DriverApi &api, int ordinal) {
  cu::Device dev = 0;
  check(api.cuDeviceGet(&dev, ordinal), [&] { return "cuDeviceGet(" + std::to_string(ordinal) + ")"; });
  return dev;
}

// The device's primary context (the one torch uses), retained once and kept for the process's
// lifetime: releasing it at exit could run after the driver has shut down.
cu::Context primary_context(const DriverApi &api, int ordinal) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_primary.find(ordinal);
  if (it != g_primary.end()) return it->second;
  cu::Context ctx = nullptr;
  cu::Device dev = device(api, ordinal);
  check(api.cuDevicePrimaryCtxRetain(&ctx, dev),
        [&] { return "cuDevicePrimaryCtxRetain(device " + std::to_string(ordinal) + ")"; });
  g_primary.emplace(ordinal, ctx);
  return ctx;
}

// Makes `ctx` current for a scope if it is not already (torch usually has it current).
class ScopedContext {
 public:
  ScopedContext(const DriverApi &api, cu::Context ctx, int ordinal) : api_(api) {
    cu::Context current = nullptr;
    check(api.cuCtxGetCurrent(&current), [] { return std::string("cuCtxGetCurrent()"); });
    if (current != ctx) {
      check(api.cuCtxPushCurrent(ctx), [&] {
        return "cuCtxPushCurrent(primary context of device " + std::to_string(ordinal) + ")";
      });
      pushed_ = true;
    }
  }
  ~ScopedContext() {
    cu::Context popped = nullptr;
    if (pushed_) api_.cuCtxPopCurrent(&popped);
  }
  ScopedContext(const ScopedContext &) = delete;
  ScopedContext &operator=(const ScopedContext &) = delete;

 private:
  const DriverApi &api_;
  bool pushed_ = false;
};

// Entries are never erased and unordered_map nodes do not move, so references stay valid; the
// launch path copies nothing (a kernel name copy would allocate on every launch).
const ModuleInfo &find_module(uintptr_t module, const char *caller) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_modules.find(module);
  if (it == g_modules.end())
    throw nb::value_error((std::string(caller) + ": " + hex(module) +
                           " is not a module handle returned by load_module").c_str());
  return it->second;
}

const FunctionInfo &find_function(uintptr_t function, const char *caller) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_functions.find(function);
  if (it == g_functions.end())
    throw nb::value_error((std::string(caller) + ": " + hex(function) +
                           " is not a function handle returned by get_function").c_str());
  return it->second;
}

// --- The module's functions -----------------------------------------------------------------

std::pair<bool, std::string> py_driver_status() {
  nb::gil_scoped_release nogil;
  return driver_status();
}

int py_device_count() {
  nb::gil_scoped_release nogil;
  const DriverApi &api = driver("device_count");
  int count = 0;
  check(api.cuDeviceGetCount(&count), [] { return std::string("cuDeviceGetCount()"); });
  return count;
}

std::pair<int, int> py_device_capability(int ordinal) {
  nb::gil_scoped_release nogil;
  const DriverApi &api = driver("device_capability");
  cu::Device dev = device(api, ordinal);
  int major = 0, minor = 0;
  auto call = [&](const char *attr) {
    return "cuDeviceGetAttribute(" + std::string(attr) + ", device " + std::to_string(ordinal) + ")";
  };
  check(api.cuDeviceGetAttribute(&major, cu::kDeviceComputeCapabilityMajor, dev),
        [&] { return call("COMPUTE_CAPABILITY_MAJOR"); });
  check(api.cuDeviceGetAttribute(&minor, cu::kDeviceComputeCapabilityMinor, dev),
        [&] { return call("COMPUTE_CAPABILITY_MINOR"); });
  return {major, minor};
}

std::string py_device_name(int ordinal) {
  nb::gil_scoped_release nogil;
  const DriverApi &api = driver("device_name");
  cu::Device dev = device(api, ordinal);
  char name[256] = {};
  check(api.cuDeviceGetName(name, static_cast<int>(sizeof(name)), dev),
        [&] { return "cuDeviceGetName(device " + std::to_string(ordinal) + ")"; });
  return name;
}

uintptr_t py_load_module(int ordinal, const nb::bytes &image) {
  const void *data = image.data();
  size_t size = image.size();
  if (size == 0) throw nb::value_error("load_module: the image is empty");
  nb::gil_scoped_release nogil;  // `image` stays referenced by the caller's frame
  const DriverApi &api = driver("load_module");
  cu::Context ctx = primary_context(api, ordinal);
  ScopedContext scope(api, ctx, ordinal);
  cu::Module module = nullptr;
  check(api.cuModuleLoadData(&module, data), [&] {
    return "cuModuleLoadData(device " + std::to_string(ordinal) + ", image of " +
           std::to_string(size) + " bytes)";
  });
  auto handle = reinterpret_cast<uintptr_t>(module);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_modules[handle] = ModuleInfo{ordinal, ctx};
  return handle;
}

uintptr_t py_get_function(uintptr_t module, const std::string &name) {
  nb::gil_scoped_release nogil;
  const DriverApi &api = driver("get_function");
  const ModuleInfo &info = find_module(module, "get_function");
  ScopedContext scope(api, info.ctx, info.ordinal);
  cu::Function function = nullptr;
  check(api.cuModuleGetFunction(&function, reinterpret_cast<cu::Module>(module), name.c_str()),
        [&] { return "cuModuleGetFunction(module " + hex(module) + ", \"" + name + "\")"; });
  size_t offset = 0, param_bytes = 0;
  if (api.cuFuncGetParamInfo == nullptr ||
      api.cuFuncGetParamInfo(function, 0, &offset, &param_bytes) != cu::kSuccess)
    param_bytes = 0;
  auto handle = reinterpret_cast<uintptr_t>(function);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_functions[handle] = FunctionInfo{info.ordinal, info.ctx, name, param_bytes};
  return handle;
}

nb::dict py_function_attributes(uintptr_t function) {
  static constexpr std::pair<const char *, int> kAttributes[] = {
      {"num_regs", cu::kFuncNumRegs},
      {"local_bytes", cu::kFuncLocalSizeBytes},
      {"max_threads", cu::kFuncMaxThreadsPerBlock},
      {"static_smem", cu::kFuncSharedSizeBytes},
      {"const_bytes", cu::kFuncConstSizeBytes},
      {"max_dynamic_smem", cu::kFuncMaxDynamicSharedSizeBytes},
      {"ptx_version", cu::kFuncPtxVersion},
      {"binary_version", cu::kFuncBinaryVersion},
  };
  constexpr size_t n = sizeof(kAttributes) / sizeof(kAttributes[0]);
  std::array<int, n> values{};
  size_t param_bytes = 0;
  {
    nb::gil_scoped_release nogil;
    const DriverApi &api = driver("function_attributes");
    const FunctionInfo &info = find_function(function, "function_attributes");
    param_bytes = info.param_bytes;
    ScopedContext scope(api, info.ctx, info.ordinal);
    for (size_t i = 0; i < n; ++i) {
      check(api.cuFuncGetAttribute(&values[i], kAttributes[i].second,
                                   reinterpret_cast<cu::Function>(function)),
            [&] { return "cuFuncGetAttribute(" + info.name + ", " + kAttributes[i].first + ")"; });
    }
  }
  nb::dict out;
  for (size_t i = 0; i < n; ++i) out[kAttributes[i].first] = values[i];
  out["param_bytes"] = param_bytes;
  return out;
}

void py_set_max_dynamic_smem(uintptr_t function, int nbytes) {
  if (nbytes < 0) throw nb::value_error("set_max_dynamic_smem: nbytes must be >= 0");
  nb::gil_scoped_release nogil;
  const DriverApi &api = driver("set_max_dynamic_smem");
  const FunctionInfo &info = find_function(function, "set_max_dynamic_smem");
  ScopedContext scope(api, info.ctx, info.ordinal);
  check(api.cuFuncSetAttribute(reinterpret_cast<cu::Function>(function),
                               cu::kFuncMaxDynamicSharedSizeBytes, nbytes),
        [&] {
          return "cuFuncSetAttribute(" + info.name + ", MAX_DYNAMIC_SHARED_SIZE_BYTES, " +
                 std::to_string(nbytes) + ") on device " + std::to_string(info.ordinal);
        });
}

uint32_t py_read_global_u32(uintptr_t module, const std::string &name) {
  nb::gil_scoped_release nogil;
  const DriverApi &api = driver("read_global_u32");
  const ModuleInfo &info = find_module(module, "read_global_u32");
  ScopedContext scope(api, info.ctx, info.ordinal);
  cu::DevicePtr ptr = 0;
  size_t bytes = 0;
  check(api.cuModuleGetGlobal(&ptr, &bytes, reinterpret_cast<cu::Module>(module), name.c_str()),
        [&] { return "cuModuleGetGlobal(module " + hex(module) + ", \"" + name + "\")"; });
  if (bytes != sizeof(uint32_t))
    throw nb::value_error(("read_global_u32: global \"" + name + "\" is " + std::to_string(bytes) +
                           " bytes, not 4").c_str());
  uint32_t value = 0;
  check(api.cuMemcpyDtoH(&value, ptr, sizeof(value)),
        [&] { return "cuMemcpyDtoH(global \"" + name + "\", 4 bytes)"; });
  return value;
}

// `programmatic`: programmatic dependent launch, i.e. the kernel may start while the previous
// kernel on the stream still runs, and waits for it itself (griddepcontrol.wait). Drivers before
// 12.4 (no cuLaunchKernelEx, or no such edges in captured graphs) get a plain launch, which is
// the same computation with the kernels strictly in turn.
void py_launch(int ordinal, uintptr_t function, const Dim3 &grid, const Dim3 &block, unsigned smem,
               uintptr_t stream, const nb::bytes &params, bool programmatic) {
  void *args[] = {const_cast<void *>(params.data())};
  size_t size = params.size();
  nb::gil_scoped_release nogil;  // `params` stays referenced by the caller's frame
  const DriverApi &api = driver("launch");
  const FunctionInfo &info = find_function(function, "launch");
  if (info.ordinal != ordinal)
    throw nb::value_error(("launch: " + info.name + " was loaded on device " +
                           std::to_string(info.ordinal) + ", not device " +
                           std::to_string(ordinal)).c_str());
  if (info.param_bytes != 0 && size != info.param_bytes)
    throw nb::value_error(("launch: " + info.name + " takes " + std::to_string(info.param_bytes) +
                           " bytes of parameters, got " + std::to_string(size)).c_str());
  ScopedContext scope(api, info.ctx, ordinal);
  const auto describe = [&](const char *entry) {
    return std::string(entry) + "(" + info.name + ", grid " + dims(grid) + ", block " + dims(block) +
           ", smem " + std::to_string(smem) + ", stream " + hex(stream) + ", device " +
           std::to_string(ordinal) + ")";
  };
  if (programmatic && api.cuLaunchKernelEx != nullptr && api.version >= 12040) {
    cu::LaunchAttribute attr{};
    attr.id = cu::kLaunchAttributeProgrammaticStreamSerialization;
    attr.value.programmatic_stream_serialization_allowed = 1;
    const cu::LaunchConfig config{grid[0], grid[1], grid[2], block[0], block[1], block[2], smem,
                                  reinterpret_cast<cu::Stream>(stream), &attr, 1};
    check(api.cuLaunchKernelEx(&config, reinterpret_cast<cu::Function>(function), args, nullptr),
          [&] { return describe("cuLaunchKernelEx") + " with programmatic stream serialization"; });
    return;
  }
  check(api.cuLaunchKernel(reinterpret_cast<cu::Function>(function), grid[0], grid[1], grid[2],
                           block[0], block[1], block[2], smem, reinterpret_cast<cu::Stream>(stream),
                           args, nullptr),
        [&] { return describe("cuLaunchKernel"); });
}

// A tiled tensor map (rank 1-5; dims and box innermost first, strides in bytes for dims 1..rank-1)
// as the 128 bytes a kernel parameter struct embeds. Pure host work: no context, no device.
nb::bytes py_encode_tensor_map(int dtype, uintptr_t address, const std::vector<uint64_t> &dims,
                               const std::vector<uint64_t> &strides,
                               const std::vector<uint32_t> &box, int swizzle) {
  const size_t rank = dims.size();
  if (rank < 1 || rank > 5 || strides.size() != rank - 1 || box.size() != rank)
    throw nb::value_error("encode_tensor_map: need 1-5 dims, rank-1 byte strides and rank box sizes");
  const DriverApi &api = driver("encode_tensor_map");
  if (api.cuTensorMapEncodeTiled == nullptr)
    throw CudaError("encode_tensor_map: the NVIDIA driver has no cuTensorMapEncodeTiled (needs a "
                    "CUDA 12 driver)");
  cu::TensorMap map{};
  const std::vector<uint32_t> element_strides(rank, 1);
  const std::vector<unsigned long long> dims_ull(dims.begin(), dims.end());
  const std::vector<unsigned long long> strides_ull(strides.begin(), strides.end());
  // interleave none (0), L2 promotion 128B (2), out-of-bounds elements read as zero (0).
  check(api.cuTensorMapEncodeTiled(&map, dtype, static_cast<unsigned>(rank),
                                   reinterpret_cast<void *>(address), dims_ull.data(),
                                   strides_ull.data(), box.data(), element_strides.data(), 0,
                                   swizzle, 2, 0),
        [&] {
          std::string text = "cuTensorMapEncodeTiled(dtype " + std::to_string(dtype) + ", address " +
                             hex(address) + ", dims";
          for (uint64_t d : dims) text += " " + std::to_string(d);
          text += ", strides";
          for (uint64_t s : strides) text += " " + std::to_string(s);
          text += ", box";
          for (uint32_t b : box) text += " " + std::to_string(b);
          return text + ", swizzle " + std::to_string(swizzle) + ")";
        });
  return nb::bytes(reinterpret_cast<const char *>(&map), sizeof(map));
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "CUDA driver-API loader for sageattn's fatbins (opens libcuda.so.1 on first use).";
  nb::exception<CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.def("driver_status", &py_driver_status,
        "Load libcuda and cuInit once; return (ok, message); never raises.");
  m.def("device_count", &py_device_count, "Number of CUDA devices the driver sees.");
  m.def("device_capability", &py_device_capability, nb::arg("ordinal"),
        "Compute capability (major, minor) of a device.");
  m.def("device_name", &py_device_name, nb::arg("ordinal"), "Marketing name of a device.");
  m.def("load_module", &py_load_module, nb::arg("ordinal"), nb::arg("image"),
        "Load a fatbin/cubin/PTX image into the device's primary context; return the module handle.");
  m.def("get_function", &py_get_function, nb::arg("module"), nb::arg("name"),
        "Handle of the named extern \"C\" kernel of a loaded module.");
  m.def("function_attributes", &py_function_attributes, nb::arg("function"),
        "Registers, local/static/const memory, thread limit, PTX and SASS versions of a kernel.");
  m.def("set_max_dynamic_smem", &py_set_max_dynamic_smem, nb::arg("function"), nb::arg("nbytes"),
        "Allow a kernel up to nbytes of dynamic shared memory.");
  m.def("read_global_u32", &py_read_global_u32, nb::arg("module"), nb::arg("name"),
        "Read a 4-byte __device__ variable of a loaded module.");
  m.def("launch", &py_launch, nb::arg("ordinal"), nb::arg("function"), nb::arg("grid"),
        nb::arg("block"), nb::arg("smem"), nb::arg("stream"), nb::arg("params"),
        nb::arg("programmatic") = false,
        "Launch a kernel on a stream with one by-value parameter struct given as bytes; "
        "programmatic=True lets it start before the previous kernel on the stream ends (the "
        "kernel must wait for it with griddepcontrol.wait; a plain launch on drivers before 12.4).");
  m.def("encode_tensor_map", &py_encode_tensor_map, nb::arg("dtype"), nb::arg("address"),
        nb::arg("dims"), nb::arg("strides"), nb::arg("box"), nb::arg("swizzle"),
        "Encode a tiled CUtensorMap (cuTensorMapEncodeTiled; dims/box innermost first, byte "
        "strides of dims 1..rank-1, CUtensorMapSwizzle code) and return its 128 bytes.");
}
