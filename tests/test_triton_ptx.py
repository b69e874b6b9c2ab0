"""What the GPU compiler makes of the Triton kernels, read without a GPU.

Each kernel family is compiled for sm_90 (``GPUTarget("cuda", 90, 32)``; Triton bundles ptxas and
cuobjdump) in a subprocess, because the interpreter is chosen when triton is first imported. The
tests then read the PTX, the TTIR and the resource usage: 16-byte vector accesses, int64 block
offsets, registers per thread (which set how many blocks fit on an SM), no shared-memory round
trips in the mixed-dtype kernels, and one table load before the data in the multi-tensor kernels.
The K-EMA kernels (K = 2, 4, 8 EMAs of one param) are held to the same, with their own
register bound.

``SEMA_KERNELS_DIR=<a copy of kernels/>`` compiles that copy instead of the installed
``sema.kernels``. That is how each property test was shown to fail on the kernels before it:
``git archive 606db1d kernels | tar -x -C /tmp/old`` then
``SEMA_KERNELS_DIR=/tmp/old/kernels pytest tests/test_triton_ptx.py`` fails the register, shared
memory and table-load tests (and passes the vector and int64 ones, which held already).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.backends.nvidia", reason="triton (with its NVIDIA backend) is not installed")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NUM_THREADS = 8 * 32  # sema.kernels.launch.NUM_WARPS warps of 32

# An SM has 65,536 registers, given to warps in units of 256 (8 per thread). At 40 registers per
# thread a block of 256 threads takes 10,240 of them, so 6 blocks fit on an SM (8 would need 32).
# Six blocks of the fp32 update have up to 6 x 256 x 128 B = 192 KB of loads in flight per SM,
# several times the 26-33 KB that Little's law asks of an H200 SM, so blocks in their store phase
# do not leave the memory system idle. The kernels before had up to 128 registers with triton 3.9,
# 208 with 3.6 (137 for an unaligned update): one to three blocks per SM.
MIN_BLOCKS_PER_SM = 6
MAX_REGISTERS = 65536 // (MIN_BLOCKS_PER_SM * NUM_THREADS) // 8 * 8
# The K-EMA kernels hold a thread's 16 param values (fp32) beside one EMA at a time: 48 registers,
# 5 blocks per SM, each with 256 x 64 B of EMA loads in flight (80 KB per SM, still more than twice
# what Little's law asks). Measured on sm_90, flat / multi-tensor kernels: triton 3.9 K=2 32-44 /
# 36-41, K=4 40-44 / 40-48, K=8 46-48 / 44; triton 3.6 K=2 34-44 / 36-43, K=4 41-48 / 37-48, K=8
# 47-48 / 44. With the single update's 8192-element blocks for 2-byte EMAs (32 param values per
# thread) and all K table addresses read up front they took up to 115.
K_EMA_MIN_BLOCKS_PER_SM = 5
K_EMA_MAX_REGISTERS = 65536 // (K_EMA_MIN_BLOCKS_PER_SM * NUM_THREADS) // 8 * 8

# (name, kernel, {argument: type}, {constexpr: value}, dtypes read, dtypes written). Pointers are
# declared 16-byte aligned, as Triton specializes them at launch. ``tensor_table_ptr`` and
# ``ALIGNED`` are arguments of the multi-tensor kernel before its per-block table (606db1d), so that
# SEMA_KERNELS_DIR can compile that version; arguments a kernel does not have are dropped.
FLAT_VARIANTS = [
    ("update fp32<-bf16 switch, tensor w", "ema._ema_update_kernel",
     {"ema_ptr": "*fp32", "param_ptr": "*bf16", "weight": "*fp32"},
     {"SWITCH": True, "WEIGHT_IS_TENSOR": True}, ["fp32", "bf16"], ["fp32", "bf16"]),
    ("update fp32<-fp32", "ema._ema_update_kernel",
     {"ema_ptr": "*fp32", "param_ptr": "*fp32", "weight": "fp32"},
     {"SWITCH": False, "WEIGHT_IS_TENSOR": False}, ["fp32", "fp32"], ["fp32"]),
    ("update fp32<-fp16 switch", "ema._ema_update_kernel",
     {"ema_ptr": "*fp32", "param_ptr": "*fp16", "weight": "fp32"},
     {"SWITCH": True, "WEIGHT_IS_TENSOR": False}, ["fp32", "fp16"], ["fp32", "fp16"]),
    ("update bf16<-bf16 switch", "ema._ema_update_kernel",
     {"ema_ptr": "*bf16", "param_ptr": "*bf16", "weight": "fp32"},
     {"SWITCH": True, "WEIGHT_IS_TENSOR": False}, ["bf16", "bf16"], ["bf16", "bf16"]),
    ("update fp16<-fp16", "ema._ema_update_kernel",
     {"ema_ptr": "*fp16", "param_ptr": "*fp16", "weight": "fp32"},
     {"SWITCH": False, "WEIGHT_IS_TENSOR": False}, ["fp16", "fp16"], ["fp16"]),
    ("switch fp32->bf16", "switch._switch_kernel", {"ema_ptr": "*fp32", "param_ptr": "*bf16"}, {},
     ["fp32"], ["bf16"]),
    ("switch fp32->fp32", "switch._switch_kernel", {"ema_ptr": "*fp32", "param_ptr": "*fp32"}, {},
     ["fp32"], ["fp32"]),
    ("switch fp16->fp16", "switch._switch_kernel", {"ema_ptr": "*fp16", "param_ptr": "*fp16"}, {},
     ["fp16"], ["fp16"]),
    ("swap packed", "swap._swap_kernel", {"ema_ptr": "*i32", "param_ptr": "*i16"},
     {"PACK_BF16": True, "RESTORE": False}, ["fp32", "bf16"], ["fp32", "bf16"]),
    ("swap packed restore", "swap._swap_kernel", {"ema_ptr": "*i32", "param_ptr": "*i16"},
     {"PACK_BF16": True, "RESTORE": True}, ["fp32", "bf16"], ["fp32", "bf16"]),
    ("swap exchange fp32", "swap._swap_kernel", {"ema_ptr": "*i32", "param_ptr": "*i32"},
     {"PACK_BF16": False, "RESTORE": False}, ["fp32", "fp32"], ["fp32", "fp32"]),
    ("swap exchange bf16", "swap._swap_kernel", {"ema_ptr": "*i16", "param_ptr": "*i16"},
     {"PACK_BF16": False, "RESTORE": False}, ["bf16", "bf16"], ["bf16", "bf16"]),
]  # fmt: skip
MULTI_VARIANTS = [
    ("multi fp32<-bf16 switch", "multi._ema_update_multi_kernel",
     {"block_table_ptr": "*i64", "tensor_table_ptr": "*i64", "weight": "fp32"},
     {"EMA_DTYPE": "fp32", "PARAM_DTYPE": "bf16", "SWITCH": True, "WEIGHT_IS_TENSOR": False, "ALIGNED": True},
     ["fp32", "bf16"], ["fp32", "bf16"]),
    ("multi fp32<-fp32", "multi._ema_update_multi_kernel",
     {"block_table_ptr": "*i64", "tensor_table_ptr": "*i64", "weight": "fp32"},
     {"EMA_DTYPE": "fp32", "PARAM_DTYPE": "fp32", "SWITCH": False, "WEIGHT_IS_TENSOR": False, "ALIGNED": True},
     ["fp32", "fp32"], ["fp32"]),
    ("multi fp16<-fp16, tensor w", "multi._ema_update_multi_kernel",
     {"block_table_ptr": "*i64", "tensor_table_ptr": "*i64", "weight": "*fp32"},
     {"EMA_DTYPE": "fp16", "PARAM_DTYPE": "fp16", "SWITCH": False, "WEIGHT_IS_TENSOR": True, "ALIGNED": True},
     ["fp16", "fp16"], ["fp16"]),
]  # fmt: skip


def k_ema_variants() -> tuple[list[tuple], list[tuple]]:
    """The K-EMA kernels (ema_k.py): flat and multi-tensor, K = 2 and 4 over every dtype pair, with
    and without the switch (at the last EMA, which keeps every param value live longest), and
    K = 8 for fp32 EMAs of bf16 params. EMA pointers past the K-th are ``None`` (constexpr)."""
    flat, multi = [], []
    cases = [(k, ema, param, switch) for k in (2, 4) for ema, param in
             (("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16"), ("fp16", "fp16"))
             for switch in (False, True)] + [(8, "fp32", "bf16", True)]  # fmt: skip
    for k, ema, param, switch in cases:
        name = f"K={k} {ema}<-{param}{' switch' if switch else ''}"
        reads, writes = [ema] * k + [param], [ema] * k + [param] * switch
        index = k - 1 if switch else -1
        types = {f"e{i}": f"*{ema}" for i in range(k)} | {"param_ptr": f"*{param}", "ws_ptr": "*fp32"}
        constexprs = {f"e{i}": None for i in range(k, 8)} | {"K": k, "SWITCH_INDEX": index}
        flat.append((f"k-ema {name}", "ema_k._ema_update_k_kernel", types, constexprs, reads, writes))
        multi_constexprs = {"EMA_DTYPE": ema, "PARAM_DTYPE": param, "K": k, "SWITCH_INDEX": index}
        multi_types = {"block_table_ptr": "*i64", "ws_ptr": "*fp32"}
        multi.append(
            (f"multi k-ema {name}", "ema_k._ema_update_k_multi_kernel", multi_types, multi_constexprs, reads, writes)
        )
    return flat, multi


K_FLAT_VARIANTS, K_MULTI_VARIANTS = k_ema_variants()
FLAT_VARIANTS += K_FLAT_VARIANTS
MULTI_VARIANTS += K_MULTI_VARIANTS

# The element count of a flat launch, as Triton specializes it: not a multiple of 16 (the tail's
# masks then split vectors: scalar accesses, the most registers), or a multiple of 16 past 2**31.
N_ELEMENTS = {"n%16!=0": "i32", "n%16==0, n>=2**31": "i64:16"}

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.util, json, os, re, subprocess, sys, tempfile
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels_dir, out_dir = sys.argv[1], sys.argv[2]
    if kernels_dir:
        import sema
        spec = importlib.util.spec_from_file_location(
            "sema.kernels", os.path.join(kernels_dir, "__init__.py"), submodule_search_locations=[kernels_dir])
        module = importlib.util.module_from_spec(spec)
        sys.modules["sema.kernels"] = module
        spec.loader.exec_module(module)
    from sema.kernels.launch import NUM_WARPS

    TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    try:
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except AttributeError:
        cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    facts = {}
    for index, (name, kernel_path, types, constexprs, block) in enumerate(json.loads(sys.stdin.read())):
        module_name, kernel_name = kernel_path.split(".")
        kernel = getattr(importlib.import_module(f"sema.kernels.{module_name}"), kernel_name)
        constexprs = {k: TL.get(v, v) if isinstance(v, str) else v for k, v in constexprs.items()}
        constexprs["BLOCK"] = block
        constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
        types = {k: v for k, v in types.items() if k in kernel.arg_names}
        signature = {arg: types.get(arg, "constexpr").split(":")[0] for arg in kernel.arg_names}
        divisible = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                     if types.get(arg, "").startswith("*") or types.get(arg, "").endswith(":16")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=divisible)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": NUM_WARPS, "enable_fp_fusion": False})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                                   capture_output=True, text=True, check=True).stdout
        for kind in ("ptx", "ttir"):
            with open(os.path.join(out_dir, f"{index}.{kind}"), "w") as f:
                f.write(compiled.asm[kind])
        facts[name] = {
            "registers": int(re.search(r"REG:(\\d+)", usage).group(1)),
            "spills": int(re.search(r"STACK:(\\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\\d+)", usage).group(1)),
            "shared_bytes": compiled.metadata.shared,
            "index": index,
        }
    print(json.dumps(facts))
    """
)


def block_size(reads: list[str], name: str) -> int:
    """The kernel's ``BLOCK``: by the widest tensor, but 4096 for every K-EMA kernel (ema_k.py)."""
    if "k-ema" in name:
        from sema.kernels.ema_k import K_BLOCK

        return K_BLOCK
    from sema.kernels.launch import block_size

    return block_size(*(DTYPES[d] for d in reads))


def all_variants() -> list[tuple]:
    """Every flat variant with each element-count specialization, and the multi-tensor ones."""
    variants = []
    for name, path, types, constexprs, reads, writes in FLAT_VARIANTS:
        for count_name, count_type in N_ELEMENTS.items():
            variants.append(
                (f"{name} ({count_name})", path, {**types, "n_elements": count_type}, constexprs, reads, writes)
            )
    return variants + MULTI_VARIANTS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    """Facts per variant name, with its PTX and TTIR text."""
    out_dir = tmp_path_factory.mktemp("sm90")
    requests = [
        (name, path, types, constexprs, block_size(reads, name))
        for name, path, types, constexprs, reads, _ in all_variants()
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, os.environ.get("SEMA_KERNELS_DIR", ""), str(out_dir)],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    for fact in facts.values():
        fact["ptx"] = Path(out_dir, f"{fact['index']}.ptx").read_text()
        fact["ttir"] = Path(out_dir, f"{fact['index']}.ttir").read_text()
    return facts


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def load_chain(ptx: str) -> int:
    """The longest chain of global loads in the PTX in which each load's address (or predicate)
    is computed from the value of the load before: 1 when every address comes from the kernel's
    arguments and the program id alone. Straight data flow, in program order."""
    depth: dict[str, int] = {}
    longest = 0
    for line in ptx.splitlines():
        code = line.split("//")[0].strip()
        match = re.match(r"(@!?%\w+\s+)?([a-z][\w.]*)\s+(.*);$", code)
        if match is None:
            continue
        guard, opcode, operands = match.groups()
        if opcode.startswith(("st.", "bra", "bar", "ret", "red.")):
            destinations, sources = "", operands
        elif operands.startswith("{"):
            destinations, sources = operands[: operands.index("}") + 1], operands[operands.index("}") + 1 :]
        else:
            destinations, _, sources = operands.partition(",")
        registers = re.findall(r"%[a-z]+\d+", sources + " " + (guard or ""))
        level = max((depth.get(register, 0) for register in registers), default=0)
        if opcode.startswith("ld.global"):
            level += 1
            longest = max(longest, level)
        for register in re.findall(r"%[a-z]+\d+", destinations):
            depth[register] = level
    return longest


def vectors(names: list[str], block: int) -> int:
    """16-byte vectors per block over the tensors of ``names``."""
    return sum(block * DTYPES[d].itemsize // (NUM_THREADS * 16) for d in names)


def test_full_blocks_move_16_byte_vectors(compiled):
    """The unmasked path of a block moves every byte in 16-byte vectors. With an element count
    that is not a multiple of 16 (and in the multi-tensor kernel, whose masked path assumes no
    alignment) the masked path is scalar, so the vector count is that of the full block."""
    wrong = []
    for name, _, types, _, reads, writes in all_variants():
        if types.get("n_elements", "i32") != "i32":
            continue
        got = compiled[name]
        block = block_size(reads, name)
        loads = count(r"ld\.global(?:\.\w+)*\.v4\.b32", got["ptx"])
        stores = count(r"st\.global(?:\.\w+)*\.v4\.b32", got["ptx"])
        expected = (vectors(reads, block), vectors(writes, block))
        if (loads, stores) != expected:
            wrong.append(f"{name}: {loads} loads, {stores} stores of 16 bytes; expected {expected}")
    assert not wrong, "\n".join(wrong)


def test_block_offsets_in_int64(compiled):
    """The block start is computed in 64 bits: a bucket past 2**31 elements cannot be run here,
    its index arithmetic can be read. Flat kernels multiply the block index by BLOCK in i64 (never
    in i32); the multi-tensor kernel widens the program id before it scales it."""
    wrong = []
    for name, _, _, _, reads, _ in all_variants():
        ttir = compiled[name]["ttir"]
        if name.startswith("multi"):
            pid = re.search(r"(%[\w.]+) = tt.get_program_id x : i32", ttir).group(1)
            widened = f"arith.extsi {pid} : i32 to i64" in ttir
            narrow_product = re.search(rf"arith.muli ({pid}\b|%[\w.]+, {pid}\b)", ttir)
            if not widened or narrow_product:
                wrong.append(f"{name}: program id widened {widened}, multiplied in i32: {bool(narrow_product)}")
            continue
        block = block_size(reads, name)
        products = {}
        for bits in ("i32", "i64"):
            constants = re.findall(rf"(%[\w.]+) = arith.constant {block} : {bits}\b", ttir)
            scalar_products = re.findall(rf"arith.muli (%[\w.]+), (%[\w.]+) : {bits}\b", ttir)
            products[bits] = [pair for pair in scalar_products if set(pair) & set(constants)]
        if not products["i64"] or products["i32"]:
            wrong.append(f"{name}: products with BLOCK={block}: {products}")
    assert not wrong, "\n".join(wrong)


def test_registers_leave_room_for_six_blocks_per_sm(compiled):
    """Every kernel, whatever its element-count specialization, uses at most ``MAX_REGISTERS``
    registers per thread (``MIN_BLOCKS_PER_SM`` blocks per SM, see above) and spills none. The
    masked last block is part of the kernel, so this bounds it too: it must not inflate the
    whole kernel."""
    wrong = [
        f"{name}: {fact['registers']} registers, {fact['spills']} bytes spilled"
        for name, fact in compiled.items()
        if "k-ema" not in name and (fact["registers"] > MAX_REGISTERS or fact["spills"])
    ]
    assert not wrong, f"more than {MAX_REGISTERS} registers per thread or spills:\n" + "\n".join(wrong)


def test_k_ema_registers(compiled):
    """The K-EMA kernels keep a thread's 16 param values in fp32 registers while they update one
    EMA after the other, so they need more than the single update, but not more with K (2, 4, 8):
    at most ``K_EMA_MAX_REGISTERS`` per thread (``K_EMA_MIN_BLOCKS_PER_SM``, see above), no spills."""
    facts = {name: fact for name, fact in compiled.items() if "k-ema" in name}
    assert {re.search(r"K=(\d+)", name).group(1) for name in facts} == {"2", "4", "8"}
    wrong = [
        f"{name}: {fact['registers']} registers, {fact['spills']} bytes spilled"
        for name, fact in facts.items()
        if fact["registers"] > K_EMA_MAX_REGISTERS or fact["spills"]
    ]
    assert not wrong, f"more than {K_EMA_MAX_REGISTERS} registers per thread or spills:\n" + "\n".join(wrong)


def test_mixed_dtype_kernels_keep_values_in_their_threads(compiled):
    """A 4-byte tensor beside a 2-byte one: each element stays in the thread that loads it, so no
    value goes through shared memory (``st.shared`` and ``bar.sync``) between the two accesses.
    The K-EMA kernels, whatever their dtypes: the param values they hold are reused in place."""
    wrong = []
    for name, _, _, _, reads, writes in all_variants():
        if len({DTYPES[d].itemsize for d in reads + writes}) < 2 and "k-ema" not in name:
            continue
        fact = compiled[name]
        found = (count(r"\bst\.shared", fact["ptx"]), count(r"\bbar\.sync", fact["ptx"]), fact["shared_bytes"])
        if any(found):
            wrong.append(f"{name}: {found[0]} st.shared, {found[1]} bar.sync, {found[2]} bytes of shared memory")
    assert not wrong, "\n".join(wrong)


def test_multi_kernel_reads_one_table_entry_before_its_data(compiled):
    """A program of the multi-tensor kernel finds its tensor and range with one round of table
    loads, straight from its program id: at most 2 dependent global loads (entry, then data).
    The flat kernels read their data straight away (1)."""
    chains = {name: load_chain(fact["ptx"]) for name, fact in compiled.items()}
    wrong = [
        f"{name}: chains of {chain} dependent loads"
        for name, chain in chains.items()
        if chain > (2 if name.startswith("multi") else 1) or chain == 0
    ]
    assert not wrong, "\n".join(wrong)


def test_load_chain_reads_dependent_loads():
    """The PTX reader of the test above, on hand-written PTX: a table, a row and data (3)."""
    ptx = """
        ld.param.b64 	%rd1, [kernel_param_0];
        mov.u32 	%r1, %ctaid.x;
        mad.wide.u32 	%rd2, %r1, 16, %rd1;
        ld.global.b64 { %rd3 }, [ %rd2 + 0 ];
        shl.b64 	%rd4, %rd3, 3;
        add.s64 	%rd5, %rd1, %rd4;
        ld.global.b64 { %rd6 }, [ %rd5 + 0 ];
        setp.lt.s64 	%p1, %rd6, 4096;
        @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd1 + 0 ];
        st.global.b32 [ %rd6 + 0 ], { %r2 };
    """
    assert load_chain(ptx) == 3
    assert load_chain(ptx.replace("shl.b64 \t%rd4, %rd3, 3;", "shl.b64 \t%rd4, %rd2, 3;")) == 2
    assert load_chain("mov.u32 \t%r1, %ctaid.x;") == 0
