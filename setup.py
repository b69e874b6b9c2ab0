"""Thin setup: metadata lives in pyproject.toml. This file builds the optional extension sema._C.

The C++ CPU kernels are built always (x86-64: a baseline object plus an AVX2 + FMA + F16C one,
picked at run time by CPU features, so the wheel runs on any x86-64 CPU); the CUDA kernels when
nvcc is found. No torch is needed at build time. Environment:

    SEMA_BUILD_EXT=0        skip sema._C (pure PyTorch install); =1 makes a failed build fatal
    SEMA_BUILD_CUDA=0|1     skip / require the CUDA part (default: build it when nvcc is found);
                            =1 makes a failed build fatal
    SEMA_CUDA_ARCHS         compute capabilities, default "80;90"; "+PTX" after one embeds its
                            PTX; without any "+PTX" the highest gets PTX
    MAX_JOBS                parallel compile jobs (default: the CPU count)
    CUDA_HOME, CUDA_PATH    where nvcc is looked for first (then PATH, then /usr/local/cuda)

By default any failure is printed with its reason and the install goes on without sema._C (or
without its CUDA part); sema.available_backends() then reports why a backend is missing.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

CPU_SOURCE = "csrc/ema_cpu.cpp"
CUDA_SOURCE = "csrc/ema_cuda.cu"
BINDINGS_SOURCE = "csrc/bindings.cpp"
DEFAULT_CUDA_ARCHS = "80;90"

CXX_FLAGS = [
    "-std=c++17",
    "-O3",
    "-g0",  # Python's CFLAGS carry -g: 5 MB of debug info in a wheel nobody debugs
    "-fPIC",
    "-fvisibility=hidden",
    "-ffp-contract=off",  # the lerp's roundings are chosen in the source (fma or not), never by the compiler
    "-fno-math-errno",
    "-fno-trapping-math",  # lets gcc if-convert, hence vectorise, the fp16 conversion
    "-Wall",
]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]  # Haswell (2013) / Zen and later; used only when the CPU has them


def log(message: str) -> None:
    print(f"sema setup: {message}", flush=True)


def env_switch(name: str) -> bool | None:
    """True for 1/true/yes/on, False for 0/false/no/off, None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"sema setup: {name}={os.environ[name]!r} is not one of 0, 1, true, false, yes, no, on, off")


def extension_required() -> bool:
    """SEMA_BUILD_EXT=1 or SEMA_BUILD_CUDA=1: a failed build fails the install."""
    return env_switch("SEMA_BUILD_EXT") is True or env_switch("SEMA_BUILD_CUDA") is True


def max_jobs() -> int:
    value = os.environ.get("MAX_JOBS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"sema setup: MAX_JOBS={value!r} is not a positive integer")
        return int(value)
    return os.cpu_count() or 1


def find_nvcc() -> str | None:
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = "/usr/local/cuda/bin/nvcc"
    return fallback if os.path.isfile(fallback) else None


def parse_cuda_archs(spec: str) -> tuple[list[str], list[str]]:
    """'80;90' -> (['80', '90'], ['90']): cubins for each, PTX for the '+PTX' ones or the highest."""
    archs, ptx = [], []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        match = re.fullmatch(r"(\d+)\.?(\d)([af]?)(\+PTX)?", token, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"SEMA_CUDA_ARCHS entry {token!r} is not like '80', '8.0', '90a' or '90+PTX'")
        arch = match.group(1) + match.group(2) + match.group(3).lower()
        archs.append(arch)
        if match.group(4):
            ptx.append(arch)
    if not archs:
        raise ValueError(f"SEMA_CUDA_ARCHS={spec!r} names no architecture")
    if not ptx:
        ptx = [max(archs, key=lambda a: int(re.sub(r"\D", "", a)))]
    return archs, ptx


def sanitize(text: str) -> str:
    """A reason fit for a C string literal passed on a command line."""
    return re.sub(r"[^A-Za-z0-9 _.,:;=()/+-]", "", text)[:300]


def cuda_library_dir(nvcc: str) -> str:
    """The directory of libcudart_static.a: where nvcc itself links from (it may be a wrapper
    script outside the toolkit), else next to nvcc's real path."""
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", CUDA_SOURCE, "-o", os.devnull], capture_output=True, text=True)
    candidates = []
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if "LIBRARIES=" in line:
            candidates += re.findall(r'-L"?([^"\s]+)', line)
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    candidates += [os.path.join(home, sub) for sub in ("lib64", "lib", f"targets/{platform.machine()}-linux/lib")]
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "libcudart_static.a")):
            return os.path.normpath(directory)
    raise FileNotFoundError(f"libcudart_static.a not found in {candidates}")


class BuildSemaExtension(build_ext):
    """Builds sema._C from objects compiled in parallel; optional unless SEMA_BUILD_EXT=1."""

    def build_extension(self, ext: Extension) -> None:
        started = time.monotonic()
        try:
            self._build(ext)
        except Exception as exc:
            if extension_required():
                raise
            log(f"building sema._C failed, installing without it (the 'torch' backend still works): {exc}")
            return
        log(f"built sema._C in {time.monotonic() - started:.1f} s")

    def _compile(self, source: str, variant: str, macros: list, flags: list[str], include_dirs=None) -> list[str]:
        return self.compiler.compile(
            [source],
            output_dir=os.path.join(self.build_temp, variant),
            macros=macros,
            include_dirs=include_dirs,
            extra_postargs=CXX_FLAGS + flags,
        )

    def _build(self, ext: Extension) -> None:
        if sys.platform == "win32":
            raise RuntimeError("the extension build supports gcc/clang only, not MSVC")
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError(f"pybind11 is needed to build sema._C ({exc})") from exc

        jobs = max_jobs()
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        cuda_wanted = env_switch("SEMA_BUILD_CUDA")
        nvcc = find_nvcc() if cuda_wanted is not False else None
        if cuda_wanted is False:
            cuda_skipped = "SEMA_BUILD_CUDA=0"
        elif nvcc is None:
            cuda_skipped = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        else:
            cuda_skipped = ""
        if cuda_skipped:
            if cuda_wanted:
                raise RuntimeError(f"SEMA_BUILD_CUDA=1 but {cuda_skipped}")
            log(f"skipping the CUDA kernels: {cuda_skipped}")

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            cuda_job = pool.submit(self._compile_cuda, nvcc, jobs) if nvcc else None
            objects, openmp = self._compile_cpu(pool, x86)
            cuda_objects, cuda_libraries = [], []
            if cuda_job is not None:
                try:
                    cuda_objects, cuda_libraries = cuda_job.result()
                except Exception as exc:
                    if cuda_wanted:
                        raise
                    cuda_skipped = f"the CUDA build failed: {exc}"
                    log(f"skipping the CUDA kernels, {cuda_skipped}")

        macros = [("SEMA_VERSION", f'"{sanitize(self.distribution.get_version())}"')]
        if x86:
            macros.append(("SEMA_WITH_AVX2", "1"))
        if cuda_objects:
            macros.append(("SEMA_WITH_CUDA", "1"))
        else:
            macros.append(("SEMA_CUDA_SKIPPED", f'"{sanitize(cuda_skipped)}"'))
        openmp_flags = ["-fopenmp"] if openmp else []
        objects += self._compile(BINDINGS_SOURCE, "bindings", macros, openmp_flags, [pybind11.get_include()])

        link_args = [*openmp_flags, "-Wl,--exclude-libs,ALL", "-Wl,-Bsymbolic"]  # keep the static cudart private
        self.compiler.link_shared_object(
            objects + cuda_objects,
            self.get_ext_fullpath(ext.name),
            extra_postargs=link_args + cuda_libraries,
            target_lang="c++",
        )

    def _compile_cpu(self, pool: ThreadPoolExecutor, x86: bool) -> tuple[list[str], bool]:
        variants = [("cpu_baseline", [])]
        if x86:
            variants.append(("cpu_avx2", [*AVX2_FLAGS, "-DSEMA_CPU_FMA=1"]))
        for openmp in (True, False):
            jobs = [
                pool.submit(
                    self._compile,
                    CPU_SOURCE,
                    name,
                    [("SEMA_CPU_NAMESPACE", name)],
                    flags + (["-fopenmp"] if openmp else []),
                )
                for name, flags in variants
            ]
            try:
                return [obj for job in jobs for obj in job.result()], openmp
            except CompileError as exc:
                if not openmp:
                    raise
                log(f"compiling the CPU kernels failed ({exc}); retrying without OpenMP, in case that is the cause")
        raise AssertionError("unreachable")

    def _compile_cuda(self, nvcc: str, jobs: int) -> tuple[list[str], list[str]]:
        archs, ptx = parse_cuda_archs(os.environ.get("SEMA_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS)
        gencode = []
        for arch in archs:
            codes = [f"sm_{arch}"] + ([f"compute_{arch}"] if arch in ptx else [])
            gencode.append(f"-gencode=arch=compute_{arch},code=[{','.join(codes)}]")
        output_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(output_dir, exist_ok=True)
        obj = os.path.join(output_dir, "ema_cuda.o")
        ptx_arch = re.sub(r"\D", "", ptx[-1])
        command = [
            nvcc,
            "-c",
            CUDA_SOURCE,
            "-o",
            obj,
            "-std=c++17",
            "-O3",
            f"--threads={min(jobs, len(archs) + len(ptx))}",
            "-Xcompiler=-fPIC,-fvisibility=hidden",
            f"-DSEMA_CUDA_PTX_ARCH={ptx_arch}",
            *gencode,
        ]
        if os.environ.get("CXX"):
            command.append(f"-ccbin={os.environ['CXX']}")
        log(f"CUDA kernels for sm_{', sm_'.join(archs)} + PTX compute_{', compute_'.join(ptx)}: {' '.join(command)}")
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc exited with {result.returncode}:\n{result.stdout}{result.stderr}")
        log(f"nvcc took {time.monotonic() - started:.1f} s")
        return [obj], [os.path.join(cuda_library_dir(nvcc), "libcudart_static.a"), "-ldl", "-lrt", "-lpthread"]


def extensions() -> list[Extension]:
    if env_switch("SEMA_BUILD_EXT") is False:
        log("SEMA_BUILD_EXT=0: not building sema._C (the 'torch' backend still works)")
        return []
    sources = [BINDINGS_SOURCE, CPU_SOURCE, CUDA_SOURCE]
    return [Extension("sema._C", sources=sources, optional=not extension_required())]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildSemaExtension})
