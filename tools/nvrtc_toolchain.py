"""The NVRTC + nvFatbin toolchain for build_kernels.py: compiles with the NVRTC library and packs
with the nvFatbin library, both through ctypes, so a machine with only PyPI's
`nvidia-cuda-nvrtc(-cu12)` and `nvidia-nvfatbin(-cu12)` wheels (no CUDA toolkit, no nvcc) builds
the fatbins. Select it with SAGEATTN_TOOLCHAIN=nvrtc.

Libraries are found through SAGEATTN_NVRTC_LIB / SAGEATTN_NVFATBIN_LIB, then the `nvidia/*/lib`
folders of the Python path (the PyPI wheels), then CUDA_HOME / CUDA_PATH / /usr/local/cuda.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path

_c_char_pp = ctypes.POINTER(ctypes.c_char_p)


def _version_key(path: Path) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path.name.split(".so", 1)[-1]))


def find_library(stem: str, env: str, major: str | None = None) -> Path:
    """The newest `lib<stem>.so.N` among the usual places (only `.so.<major>` when given: a
    flavour's own CUDA release, though torch may bring another); `env` names an explicit path."""
    if os.environ.get(env):
        return Path(os.environ[env])
    pattern = f"lib{stem}.so.{major}*" if major else f"lib{stem}.so.*[0-9]"
    found: list[Path] = []
    for entry in sys.path:
        found += [p for p in Path(entry).glob(f"nvidia/*/lib/{pattern}") if p.name[-1].isdigit()]
    if found:
        return max(found, key=_version_key)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            found += Path(os.environ[var]).glob(f"lib64/{pattern}")
    found += Path("/usr/local/cuda").glob(f"lib64/{pattern}")
    found = [p for p in found if p.name[-1].isdigit()]
    if not found:
        raise FileNotFoundError(f"lib{stem}.so not found: set {env}, or install the PyPI wheel "
                                f"(nvidia-cuda-nvrtc-cu12 / nvidia-nvfatbin-cu12 or their CUDA 13 builds)")
    return max(found, key=_version_key)


class _Nvrtc:
    """The NVRTC entry points used here (nvrtc.h: every call returns an nvrtcResult, 0 = success)."""

    def __init__(self, path: Path):
        self.path = path
        # libnvrtc dlopen-s libnvrtc-builtins by bare name; the CUDA 13 wheel sets no RPATH for it,
        # so load it first from the same folder (a loaded soname satisfies the later dlopen).
        for builtins in sorted(path.parent.glob("libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(path))
        self.lib = lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                           ctypes.c_char_p, ctypes.c_int, _c_char_pp, _c_char_pp]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, _c_char_pp]
        for name in ("nvrtcGetProgramLogSize", "nvrtcGetCUBINSize", "nvrtcGetPTXSize"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        for name in ("nvrtcGetProgramLog", "nvrtcGetCUBIN", "nvrtcGetPTX"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]

    def check(self, result: int, call: str) -> None:
        if result != 0:
            raise RuntimeError(f"{call} failed: {self.lib.nvrtcGetErrorString(result).decode()}")

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return f"{major.value}.{minor.value}"

    def supported_archs(self) -> set[str]:
        """The architecture numbers this NVRTC can target ("120", "121", ...)."""
        count = ctypes.c_int()
        self.check(self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * count.value)()
        self.check(self.lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return {str(a) for a in archs}

    def _read(self, prog, size_fn: str, get_fn: str) -> bytes:
        size = ctypes.c_size_t()
        self.check(getattr(self.lib, size_fn)(prog, ctypes.byref(size)), size_fn)
        buf = ctypes.create_string_buffer(size.value)
        self.check(getattr(self.lib, get_fn)(prog, buf), get_fn)
        return buf.raw

    def compile(self, source: str, name: str, options: list[str], ptx: bool) -> tuple[bytes, str]:
        """(cubin or PTX, compiler log); raises RuntimeError with the log on failure."""
        prog = ctypes.c_void_p()
        self.check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(),
                                               0, None, None), "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            result = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            log = self._read(prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog")
            log = log.rstrip(b"\0").decode(errors="replace")
            if result != 0:
                raise RuntimeError(f"nvrtcCompileProgram({name}, {' '.join(options)}) failed: "
                                   f"{self.lib.nvrtcGetErrorString(result).decode()}\n{log}")
            if ptx:
                image = self._read(prog, "nvrtcGetPTXSize", "nvrtcGetPTX").rstrip(b"\0")
            else:
                image = self._read(prog, "nvrtcGetCUBINSize", "nvrtcGetCUBIN")
            return image, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


class _NvFatbin:
    """The nvFatbin entry points used here (nvFatbin.h: every call returns an nvFatbinResult)."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        self.lib = lib
        lib.nvFatbinGetErrorString.restype = ctypes.c_char_p
        lib.nvFatbinCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), _c_char_pp, ctypes.c_size_t]
        lib.nvFatbinAddCubin.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                         ctypes.c_char_p, ctypes.c_char_p]
        lib.nvFatbinAddPTX.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                       ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.nvFatbinSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvFatbinGet.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvFatbinDestroy.argtypes = [ctypes.POINTER(ctypes.c_void_p)]

    def check(self, result: int, call: str) -> None:
        if result != 0:
            raise RuntimeError(f"{call} failed: {self.lib.nvFatbinGetErrorString(result).decode()}")

    def version(self) -> str:
        major, minor = ctypes.c_uint(), ctypes.c_uint()
        self.check(self.lib.nvFatbinVersion(ctypes.byref(major), ctypes.byref(minor)), "nvFatbinVersion")
        return f"{major.value}.{minor.value}"

    def pack(self, images: list[tuple[object, bytes, str]], options: tuple = ()) -> bytes:
        """A fatbin of (build_kernels.Arch, cubin or PTX, identifier) images; `options` as
        nvFatbinCreate takes them (`-compress-all`)."""
        handle = ctypes.c_void_p()
        names = [b"-64", *(o.encode() for o in options)]
        opts = (ctypes.c_char_p * len(names))(*names)
        self.check(self.lib.nvFatbinCreate(ctypes.byref(handle), opts, len(names)),
                   f"nvFatbinCreate({' '.join(n.decode() for n in names)})")
        try:
            for arch, data, ident in images:
                call = f"nvFatbinAdd{'PTX' if arch.virtual else 'Cubin'}({arch.name}, {ident})"
                if arch.virtual:
                    # nvFatbin wants the PTX with its terminating NUL counted.
                    ptx = data + b"\0"
                    result = self.lib.nvFatbinAddPTX(handle, ptx, len(ptx), arch.code.encode(),
                                                     ident.encode(), b"")
                else:
                    result = self.lib.nvFatbinAddCubin(handle, data, len(data), arch.code.encode(),
                                                       ident.encode())
                self.check(result, call)
            size = ctypes.c_size_t()
            self.check(self.lib.nvFatbinSize(handle, ctypes.byref(size)), "nvFatbinSize")
            buf = ctypes.create_string_buffer(size.value)
            self.check(self.lib.nvFatbinGet(handle, buf), "nvFatbinGet")
            return buf.raw
        finally:
            self.lib.nvFatbinDestroy(ctypes.byref(handle))


class Nvrtc:
    """NVRTC compiles (a cubin for sm_XX, PTX for compute_XX); nvFatbin packs. Implements
    build_kernels.Toolchain (not imported: build_kernels runs as a script)."""

    name = "nvrtc"

    def __init__(self, flags: tuple[str, ...], cuda_major: str | None = None):
        self.flags = list(flags)
        self.nvrtc = _Nvrtc(find_library("nvrtc", "SAGEATTN_NVRTC_LIB", cuda_major))
        self.nvfatbin = _NvFatbin(find_library("nvfatbin", "SAGEATTN_NVFATBIN_LIB", cuda_major))

    def version(self) -> str:
        return f"nvrtc {self.nvrtc.version()} + nvfatbin {self.nvfatbin.version()}"

    def cuda_versions(self) -> list[str]:
        return [self.nvrtc.version(), self.nvfatbin.version()]

    def supported_archs(self) -> set[str]:
        return self.nvrtc.supported_archs()

    def compile(self, source, include_dirs, arch, out):
        options = [*self.flags, f"--gpu-architecture={arch.name}",
                   *(f"--include-path={d}" for d in include_dirs)]
        image, log = self.nvrtc.compile(Path(source).read_text(), Path(source).name, options,
                                        ptx=arch.virtual)
        Path(out).write_bytes(image)
        return log

    def pack(self, images, out, options=()):
        loaded = [(arch, Path(path).read_bytes(), Path(path).name) for arch, path in images]
        # fatbinary spells its options `--compress-all`, nvFatbin `-compress-all`.
        options = tuple(o[1:] if o.startswith("--") else o for o in options)
        Path(out).write_bytes(self.nvfatbin.pack(loaded, options))
