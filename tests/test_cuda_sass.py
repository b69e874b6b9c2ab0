"""What the sm_90 machine code of csrc/ema_cuda.cu promises about memory traffic, read without a GPU.

A memory-bound kernel on an H200 needs about 26-33 KB of loads in flight per SM (Little's law:
~4.3 TB/s x ~800 ns over 132 SMs). Per thread that is the 16-byte loads it issues before it must
wait (its first store depends on them), times the threads resident per SM, which the registers
per thread limit (65536 per SM, 2048 threads per SM, kThreads per block from the source). This
file compiles the kernels for sm_90 with nvcc, as setup.py does (-O3), reads the SASS
(``cuobjdump -sass``) and the resource usage (``cuobjdump --dump-resource-usage``), and checks
per kernel family (update, update + switch, switch, swap, multi-tensor update):

- loads: in program order, each kernel has a run of at least max(4, 2 x L) 128-bit global
  loads with no global store between them, L being the 16-byte loads of one vector step of its
  dtype pair (1: same-dtype switch; 2: fp32 update, 16-bit update, fp32 -> 16-bit switch,
  same-dtype swap; 3: fp32 EMA with 16-bit params). That is two or more vector steps in flight.
- registers: at most 48 per thread and no spills, so that register-limited occupancy is at least
  1280 threads (5 blocks of 256) per SM.
- bytes in flight: occupancy x the run above x 16 bytes >= 80 KB per SM (2.4x the need).

The K-EMA kernels (``ema_k_kernel``, ``ema_k_multi_kernel``: K EMAs of one param, one pass) load
a tile of the param once, then walk the EMAs: each EMA step loads that EMA's tile (all its loads
before its first store) and stores it. Their first step (param + EMA 0) is the run above and is
held to the same bound; each later step has only the EMA's share of that run in flight (u
vectors of L_ema 16-byte loads, u = run / (L_param + L_ema)), held to >= 40 KB per SM (1.2x the
need): 80 KB for the flat kernels, 40 KB for the multi-tensor ones with 16-bit EMAs, whose
tile is halved to stay within 48 registers with no spill (their piece addresses live in
registers, not in the kernel arguments).

Each assertion fails on the kernels before this layout (``git show f2d5097:csrc/ema_cuda.cu >
/tmp/old_ema_cuda.cu; SEMA_CUDA_SOURCE=/tmp/old_ema_cuda.cu pytest tests/test_cuda_sass.py``):
all 15 family tests fail there (runs of 1-4 loads; 46-64 registers, so every family has kernels
at 4 blocks per SM; 16-64 KB in flight), only the 3 tests of the readers pass. The multi-tensor
family there is the flat update kernel, which took a table of up to 64 tensors as its argument.
``SEMA_CUDA_SOURCE`` points this file at any other source.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("SEMA_CUDA_SOURCE") or ROOT / "csrc" / "ema_cuda.cu")
ARCH = "sm_90"
NVCC_FLAGS = ["-std=c++17", "-O3", "-cubin", f"-arch={ARCH}"]  # setup.py's, for one cubin

REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 256  # registers are handed out per warp in units of 256
MAX_REGISTERS = 48
MIN_THREADS_PER_SM = 1280
MIN_BYTES_IN_FLIGHT_PER_SM = 80 * 1024

OPS = {0: "update", 1: "update_switch", 2: "switch", 3: "exchange", 4: "pack", 5: "unpack"}
ELEMENT_BYTES = {"Float32": 4, "Word32": 4, "BFloat16": 2, "Float16": 2, "Word16": 2}
MIN_BYTES_IN_FLIGHT_PER_EMA_STEP = 40 * 1024
FAMILIES = ["update", "update_switch", "switch", "swap", "multi_update", "k_update", "k_multi_update"]
K_FAMILIES = {"k_update": "ema_k_kernel", "k_multi_update": "ema_k_multi_kernel"}


def find_tool(name: str) -> str | None:
    """nvcc or cuobjdump: PATH, CUDA_HOME, /usr/local/cuda, then the copy Triton ships."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    try:
        import triton

        homes.append(str(Path(triton.__file__).parent / "backends" / "nvidia"))
    except ImportError:
        pass
    for home in filter(None, homes):
        candidate = Path(home) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return None


@dataclass
class Kernel:
    name: str  # mangled
    kind: str  # "ema_kernel", "ema_multi_kernel", "ema_k_kernel" or "ema_k_multi_kernel"
    ema: str
    param: str
    op: str
    sass: list[str]  # opcodes in program order
    registers: int
    stack: int
    local: int
    takes_table: bool  # the multi-tensor table as a kernel argument (the layout before pieces)

    @property
    def loads_per_vector(self) -> int:
        """16-byte loads of one vector step: 16 bytes of the narrower dtype, the wider one twice."""
        e, p = ELEMENT_BYTES[self.ema], ELEMENT_BYTES[self.param]
        vector = 16 // min(e, p)
        read = vector * e + (vector * p if self.op != "switch" else 0)
        return read // 16

    @property
    def ema_loads_per_vector(self) -> int:
        """16-byte loads of one EMA's share of a vector step."""
        e, p = ELEMENT_BYTES[self.ema], ELEMENT_BYTES[self.param]
        return 16 // min(e, p) * e // 16

    def ema_step_loads(self, run: int) -> int:
        """The loads of one EMA step of a K-EMA kernel whose first step is a run of ``run``."""
        return run // self.loads_per_vector * self.ema_loads_per_vector

    def __str__(self) -> str:
        return f"{self.kind}<{self.ema}, {self.param}, {self.op}>"


def demangle(name: str) -> tuple[str, str, str, str]:
    """(kernel, ema type, param type, op) from names like ...10ema_kernelINS1_7Float32ES3_LNS1_2OpE1EEEv...
    or ...12ema_k_kernelINS1_7Float32ENS1_8BFloat16EEEv... (op "update_k")."""
    match = re.search(r"(ema_multi_kernel|ema_kernel)I(.*?)LNS1_2OpE(\d)E", name)
    k_match = re.search(r"(ema_k_multi_kernel|ema_k_kernel)I(.*?)EEv", name)
    assert match or k_match, f"not a sema kernel: {name}"
    types, rest = [], (match or k_match).group(2)
    while rest:
        if rest.startswith("S3_"):
            types.append(types[0])
            rest = rest[3:]
            continue
        token = re.match(r"NS1_(\d+)", rest)
        assert token, f"cannot read the template arguments of {name}"
        length, start = int(token.group(1)), token.end()
        types.append(rest[start : start + length])
        rest = rest[start + length + 1 :]  # and the closing E
    assert len(types) == 2, f"expected two element types in {name}"
    if k_match:
        return k_match.group(1), types[0], types[1], "update_k"
    return match.group(1), types[0], types[1], OPS[int(match.group(3))]


def opcodes(sass: str) -> list[str]:
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", sass)


def longest_load_run(ops: list[str]) -> int:
    """The most 128-bit global loads in a row, in program order, with no global store between."""
    best = run = 0
    for op in ops:
        if re.match(r"LDG\.|LD\.", op) and ".128" in op:
            run += 1
            best = max(best, run)
        elif re.match(r"STG\.|ST\.", op):
            run = 0
    return best


def threads_per_sm(registers: int, block_threads: int) -> int:
    """Register-limited resident threads per SM (also capped by threads and blocks per SM)."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps = REGISTERS_PER_SM // per_warp if per_warp else THREADS_PER_SM // 32
    blocks = min(warps // (block_threads // 32), THREADS_PER_SM // block_threads, BLOCKS_PER_SM)
    return blocks * block_threads


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[list[Kernel], int]:
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None:
        pytest.skip("nvcc not found: the SASS checks compile csrc/ema_cuda.cu for sm_90")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's copy): the SASS checks read the cubin with it")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(NVCC_FLAGS).encode()).hexdigest()[:16]
    cubin = tmp_path_factory.mktemp("cuda-sass") / f"ema_cuda_{digest}.cubin"
    build = subprocess.run(
        [nvcc, *NVCC_FLAGS, "-o", str(cubin), "-x", "cu", str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-4000:]}"
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run(
        [cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    resources = {
        m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4)))
        for m in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    }
    kernels = []
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split()[0]
        kind, ema, param, op = demangle(name)
        registers, stack, local = resources[name]
        kernels.append(
            Kernel(name, kind, ema, param, op, opcodes(block), registers, stack, local, "TensorTable" in name)
        )
    threads = re.search(r"constexpr int kThreads = (\d+);", source.decode())
    assert threads, f"no kThreads in {SOURCE}"
    return kernels, int(threads.group(1))


def family(kernels: list[Kernel], name: str) -> list[Kernel]:
    flat = [k for k in kernels if k.kind == "ema_kernel"]
    if name in K_FAMILIES:
        selected = [k for k in kernels if k.kind == K_FAMILIES[name]]
    elif name == "multi_update":
        multi = [k for k in kernels if k.kind == "ema_multi_kernel"]
        # before the piece tables, the multi-tensor launch was the flat kernel with a table argument
        selected = multi or [k for k in flat if k.takes_table and k.op in ("update", "update_switch")]
    elif name == "swap":
        selected = [k for k in flat if k.op in ("exchange", "pack", "unpack")]
    else:
        selected = [k for k in flat if k.op == name]
    assert selected, f"no {name} kernels in {SOURCE}"
    return selected


@pytest.mark.parametrize("name", FAMILIES)
def test_loads_issued_before_the_first_store(compiled, name):
    kernels, _ = compiled
    short = []
    for kernel in family(kernels, name):
        needed = max(4, 2 * kernel.loads_per_vector)
        run = longest_load_run(kernel.sass)
        if run < needed:
            short.append(f"{kernel}: {run} 128-bit loads before a store, needs {needed}")
    assert not short, "\n".join(short)


@pytest.mark.parametrize("name", FAMILIES)
def test_registers_and_occupancy(compiled, name):
    kernels, block_threads = compiled
    over = []
    for kernel in family(kernels, name):
        threads = threads_per_sm(kernel.registers, block_threads)
        if kernel.registers > MAX_REGISTERS or kernel.stack or kernel.local or threads < MIN_THREADS_PER_SM:
            over.append(
                f"{kernel}: {kernel.registers} registers (at most {MAX_REGISTERS}), stack {kernel.stack}, "
                f"local {kernel.local} bytes: {threads} threads per SM, needs {MIN_THREADS_PER_SM}"
            )
    assert not over, "\n".join(over)


@pytest.mark.parametrize("name", FAMILIES)
def test_bytes_in_flight_per_sm(compiled, name):
    kernels, block_threads = compiled
    short = []
    for kernel in family(kernels, name):
        in_flight = threads_per_sm(kernel.registers, block_threads) * longest_load_run(kernel.sass) * 16
        if in_flight < MIN_BYTES_IN_FLIGHT_PER_SM:
            short.append(
                f"{kernel}: {in_flight / 1024:.0f} KB in flight per SM, needs {MIN_BYTES_IN_FLIGHT_PER_SM // 1024}"
            )
    assert not short, "\n".join(short)


@pytest.mark.parametrize("name", list(K_FAMILIES))
def test_bytes_in_flight_per_ema_step(compiled, name):
    """After the first step a K-EMA kernel holds the param tile in registers and loads one EMA's
    tile per step: that share of the first run, at the kernel's occupancy."""
    kernels, block_threads = compiled
    short = []
    for kernel in family(kernels, name):
        run = longest_load_run(kernel.sass)
        step = kernel.ema_step_loads(run)
        in_flight = threads_per_sm(kernel.registers, block_threads) * step * 16
        if run % kernel.loads_per_vector or in_flight < MIN_BYTES_IN_FLIGHT_PER_EMA_STEP:
            short.append(
                f"{kernel}: a first run of {run} loads, {step} per EMA step: {in_flight / 1024:.0f} KB in flight "
                f"per SM, needs {MIN_BYTES_IN_FLIGHT_PER_EMA_STEP // 1024}"
            )
    assert not short, "\n".join(short)


# --- the readers themselves ---------------------------------------------------------------


def test_load_run_counts_only_loads_not_separated_by_stores():
    """Negative control: load, store, load (what the kernels did before) is a run of one."""
    lines = [
        "/*0100*/                   LDG.E.128 R16, desc[UR4][R28.64] ;",
        "/*0110*/                   STG.E.128 desc[UR4][R28.64], R12 ;",
        "/*0120*/               @P0 LDG.E.128 R12, desc[UR4][R28.64+0x10] ;",
        "/*0130*/                   LDG.E R4, desc[UR4][R10.64] ;",
        "/*0140*/              @!P1 STG.E.U16 desc[UR4][R10.64+0x2], R17 ;",
        "/*0150*/                   LDG.E.128 R20, desc[UR4][R26.64] ;",
        "/*0160*/                   LDG.E.128 R24, desc[UR4][R26.64+0x1000] ;",
    ]
    assert (
        opcodes("\n".join(lines)) == ["LDG.E.128", "STG.E.128", "LDG.E.128", "LDG.E", "STG.E.U16"] + ["LDG.E.128"] * 2
    )
    assert longest_load_run(opcodes("\n".join(lines))) == 2
    assert longest_load_run(opcodes("\n".join(lines[:3]))) == 1


def test_occupancy_from_registers():
    """65536 registers per SM, allocated per warp in units of 256; 256-thread blocks."""
    assert threads_per_sm(32, 256) == 2048
    assert threads_per_sm(40, 256) == 1536
    assert threads_per_sm(48, 256) == 1280
    assert threads_per_sm(56, 256) == 1024
    assert threads_per_sm(64, 256) == 1024
    assert threads_per_sm(65, 256) == 768


def test_demangle():
    assert demangle(
        "_ZN4sema4cuda44_GLOBAL__N__5af9_11_ema_cuda_cu_c46710ema_kernelINS1_7Float32ES3_LNS1_2OpE1EEEvmmllPKff"
    ) == (
        "ema_kernel",
        "Float32",
        "Float32",
        "update_switch",
    )
    assert demangle(
        "_ZN4sema4cuda8_GLOBAL_16ema_multi_kernelINS1_7Float32ENS1_8BFloat16ELNS1_2OpE0EEEvPKNS1_5PieceEPKff"
    )[1:] == ("Float32", "BFloat16", "update")
    assert demangle(
        "_ZN4sema4cuda44_GLOBAL__N__5af9eaa2_11_ema_cuda_cu_c4670dba12ema_k_kernelINS1_7Float32ENS1_8BFloat16EEEvNS1_"
        "12EmaAddressesEimllPKfi"
    ) == ("ema_k_kernel", "Float32", "BFloat16", "update_k")
    assert demangle(
        "_ZN4sema4cuda44_GLOBAL__N__5af9eaa2_11_ema_cuda_cu_c4670dba18ema_k_multi_kernelINS1_8BFloat16ES3_EEvPKliPKfi"
    ) == ("ema_k_multi_kernel", "BFloat16", "BFloat16", "update_k")
