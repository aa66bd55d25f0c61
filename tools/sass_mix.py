#!/usr/bin/env python3
"""Instruction mix of an attention kernel's main loop, per key block, from its SASS.

    python tools/sass_mix.py build/kernels/sm89.fatbin sm_89 sm89_qkint8_pvfp8_acc16x32_hd128
    python tools/sass_mix.py DIR sm_90 NAME [NAME ...]      # DIR: a build_kernels.py --out folder
    python tools/sass_mix.py ... --blocks                    # also list the loop's basic blocks
    python tools/sass_mix.py ... --summary                   # one line per kernel

Disassembles the arch's cubin with nvdisasm (line info with inlining: build with -lineinfo, as
build_kernels.py does), builds the control-flow graph, takes the natural loop that holds the
MMA instructions (one iteration = one key block) and counts its instructions by class:

- `loop`: every instruction of the loop body (static), cold paths included;
- `steady`: the basic blocks a dense, interior key block runs: the body minus blocks whose
  instructions come mostly from a COLD function (the diagonal/last-block mask, the first
  iteration's Q fragments, the block-sparse cursor): those run on a few blocks per CTA or only
  for sparse calls, and are listed on their own.

Registers and stack (spill) bytes come from cuobjdump -res-usage; LDL/STL are counted too.
nvdisasm/cuobjdump: PATH, NVDISASM_PATH/CUOBJDUMP_PATH, or the nvidia-cuda-nvdisasm and
nvidia-cuda-cuobjdump wheels of this Python.  Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Functions whose code runs on a few key blocks per CTA, or only for block-sparse calls.
COLD = ("mask_scores", "load_q_fragments", "next_kept_block", "KeptBlocks::advance", "KeptBlocks::next",
        "KeptBlocks::fill_window")

# Class of an opcode (its first dot-separated word), in table order.
CLASSES = (
    ("mma", {"IMMA", "HMMA", "QMMA", "OMMA", "DMMA", "HGMMA", "IGMMA", "QGMMA"}),
    ("ldsm", {"LDSM"}),
    ("fp32", {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK"}),
    ("mufu", {"MUFU"}),
    ("cvt", {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"}),
    ("fp16", {"HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2"}),
    ("int/addr", {"IADD3", "IADD", "IMAD", "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP",
                  "IMNMX", "IABS", "SEL", "PRMT", "POPC", "FLO", "BREV", "BMSK", "VIADD", "VIMNMX",
                  "IMUL", "PLOP3", "P2R", "R2P"}),
    ("uniform", None),  # U* opcodes (uniform datapath), filled below
    ("mov", {"MOV", "S2R", "CS2R", "S2UR", "R2UR"}),
    ("shfl/vote", {"SHFL", "VOTE", "VOTEU", "REDUX", "MATCH"}),
    ("lds/sts", {"LDS", "STS", "ATOMS"}),
    ("gmem", {"LDG", "STG", "LDGSTS", "LDGDEPBAR", "LD", "ST", "RED", "ATOMG"}),
    ("spill", {"LDL", "STL"}),
    ("ctrl", {"BRA", "BAR", "DEPBAR", "BSSY", "BSYNC", "WARPSYNC", "EXIT", "NOP", "CALL", "RET",
              "YIELD", "BREAK", "JMP", "JMX", "BRX", "ERRBAR", "MEMBAR"}),
)
CLASS_NAMES = tuple(name for name, _ in CLASSES) + ("other",)
MMA = CLASSES[0][1]


def opcode_class(op: str) -> str:
    base = op.split(".")[0]
    if base.startswith("IMAD") and ".MOV" in op:
        return "mov"
    for name, ops in CLASSES:
        if ops is not None and base in ops:
            return name
    if base.startswith("U") or base in ("ULDC",):
        return "uniform"
    return "other"


# ---------------------------------------------------------------------------------------------
# Tools


def _tool(name: str) -> str:
    env = os.environ.get(f"{name.upper()}_PATH")
    if env:
        return env
    found = shutil.which(name)
    if found:
        return found
    for entry in sys.path:
        for p in sorted(Path(entry or ".").glob(f"nvidia/*/bin/{name}")):
            return str(p)
    raise FileNotFoundError(f"{name} not found: put it on PATH, set {name.upper()}_PATH, or "
                            f"pip install nvidia-cuda-{name}")


def disassemble(fatbin: Path, arch: str) -> tuple[str, dict]:
    """nvdisasm -c -gi of the fatbin's cubin for `arch` (e.g. sm_89), and per kernel its
    resource usage from cuobjdump -res-usage ({name: {"REG": 221, "STACK": 0, ...}})."""
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    listing = subprocess.run([cuobjdump, "-lelf", str(fatbin)], check=True, capture_output=True,
                             text=True).stdout
    names = [line.split(":")[-1].strip() for line in listing.splitlines() if line.startswith("ELF file")]
    cubins = [n for n in names if n.endswith(f".{arch}.cubin")]
    if len(cubins) != 1:
        raise SystemExit(f"{fatbin}: no single {arch} cubin among {names}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([cuobjdump, "-xelf", cubins[0], str(Path(fatbin).resolve())], check=True,
                       capture_output=True, cwd=tmp)
        cubin = str(Path(tmp) / cubins[0])
        text = subprocess.run([nvdisasm, "-c", "-gi", cubin], check=True, capture_output=True,
                              text=True).stdout
        usage_text = subprocess.run([cuobjdump, "-res-usage", cubin], check=True, capture_output=True,
                                    text=True).stdout
    usage, name = {}, None
    for line in usage_text.splitlines():
        m = re.match(r"\s*Function (\w+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return text, usage


# ---------------------------------------------------------------------------------------------
# Parsing


class Instr:
    __slots__ = ("addr", "pred", "op", "text", "frames", "target", "labels")

    def __init__(self, addr, pred, op, text, frames):
        self.addr, self.pred, self.op, self.text, self.frames = addr, pred, op, text, frames
        m = re.search(r"`\((\.L_x_\d+)\)", text)
        self.target = m.group(1) if m else None
        self.labels = []


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def parse_function(text: str, name: str) -> list[Instr]:
    """The function's instructions, with their source frames (innermost first)."""
    lines = text.splitlines()
    try:
        start = lines.index(f"{name}:")
    except ValueError:
        raise SystemExit(f"kernel {name} not in this cubin") from None
    instrs, frames, pending_labels, new_group = [], [], [], True
    for line in lines[start + 1:]:
        if line.startswith("\t.section") or line.startswith("//----"):
            break
        s = line.strip()
        if s.startswith("//## File"):
            if new_group:
                frames, new_group = [], False
            frames.append(tuple(_FRAME.search(s).groups()))
            continue
        if re.fullmatch(r"\.L_x_\d+:", s):
            pending_labels.append(s[:-1])
            continue
        m = _INSTR.match(line)
        if m:
            new_group = True
            ins = Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), s, tuple(frames))
            ins.labels, pending_labels = pending_labels, []
            instrs.append(ins)
    return instrs


_FUNC_DEF = re.compile(r"^\s*(?:static\s+)?(?:__device__|__global__)[^(]*?\b([A-Za-z_]\w*)\s*\(")
_STRUCT = re.compile(r"^\s*struct\s+(\w+)")
_func_cache: dict[str, list[str]] = {}


def function_at(path: str, line: int) -> str:
    """Name of the device function (Struct::name for members) defined around `path:line`."""
    if path not in _func_cache:
        names, current, struct = [], "?", None
        try:
            src = Path(path).read_text().splitlines()
        except OSError:
            src = []
        for text in src:
            m = _STRUCT.match(text)
            if m and not text.rstrip().endswith(";"):
                struct = m.group(1)
            if text.startswith("}"):
                struct = None
            m = _FUNC_DEF.match(text)
            if m:
                current = f"{struct}::{m.group(1)}" if struct and text.startswith("  ") else m.group(1)
            names.append(current)
        _func_cache[path] = names
    names = _func_cache[path]
    return names[line - 1] if 0 < line <= len(names) else "?"


def functions_of(ins: Instr) -> list[str]:
    return [function_at(path, int(line)) for path, line in ins.frames]


# ---------------------------------------------------------------------------------------------
# Control flow


def basic_blocks(instrs: list[Instr]):
    """[(first, last) index pairs], successor lists."""
    label_at = {lab: i for i, ins in enumerate(instrs) for lab in ins.labels}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.target is not None and ins.target in label_at:
            leaders.add(label_at[ins.target])
            leaders.add(i + 1)
        elif ins.op in ("EXIT", "RET", "BRX", "JMX") or ins.op.startswith("BRA"):
            leaders.add(i + 1)
        if ins.labels:
            leaders.add(i)
    starts = sorted(x for x in leaders if x < len(instrs))
    blocks = [(s, (starts[k + 1] if k + 1 < len(starts) else len(instrs)) - 1) for k, s in enumerate(starts)]
    block_of = {s: k for k, (s, _) in enumerate(blocks)}
    succ = []
    for k, (s, e) in enumerate(blocks):
        last = instrs[e]
        out = []
        if last.target is not None and last.target in label_at:
            out.append(block_of[label_at[last.target]])
        unconditional_exit = (last.op.startswith("BRA") or last.op in ("EXIT", "RET")) and not last.pred
        if not unconditional_exit and k + 1 < len(blocks):
            out.append(k + 1)
        succ.append(out)
    return blocks, succ


def dominators(succ, pred) -> list[int]:
    """Per block, the set of blocks that dominate it (a bit mask; block 0 is the entry)."""
    n = len(succ)
    everything = (1 << n) - 1
    dom = [everything] * n
    dom[0] = 1
    changed = True
    while changed:
        changed = False
        for b in range(1, n):
            meet = everything
            for p in pred[b]:
                meet &= dom[p]
            new = meet | (1 << b) if pred[b] else 1 << b
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def mma_loop(instrs, blocks, succ):
    """Blocks of the natural loop with the most MMAs (the key-block loop), header first. Only
    edges n -> h whose target dominates their source are back edges: the out-of-line retry
    blocks of mbarrier waits jump back into the code above them without closing a loop."""
    pred = collections.defaultdict(list)
    for k, outs in enumerate(succ):
        for t in outs:
            pred[t].append(k)
    dom = dominators(succ, pred)
    best = None
    for n, outs in enumerate(succ):
        for h in outs:
            if not dom[n] >> h & 1:
                continue
            body, stack = {h, n}, [n]
            while stack:
                x = stack.pop()
                if x == h:
                    continue
                for p in pred[x]:
                    if p not in body:
                        body.add(p)
                        stack.append(p)
            mmas = sum(1 for b in body for i in range(blocks[b][0], blocks[b][1] + 1)
                       if instrs[i].op.split(".")[0] in MMA)
            key = (mmas, len(body))
            if mmas and (best is None or key > best[0]):
                best = (key, h, sorted(body))
    if best is None:
        raise SystemExit("no loop with MMA instructions")
    return best[2]


def cold_group(instrs, block, cold) -> str | None:
    """The COLD function most of the block's instructions come from, if most do."""
    s, e = block
    votes = collections.Counter()
    for i in range(s, e + 1):
        hit = next((f for f in functions_of(instrs[i]) if f in cold), None)
        votes[hit] += 1
    name, count = max(votes.items(), key=lambda kv: (kv[0] is not None, kv[1]))
    return name if name is not None and 2 * count > (e - s + 1) else None


# ---------------------------------------------------------------------------------------------
# Report


def count(instrs, indices) -> collections.Counter:
    c = collections.Counter(opcode_class(instrs[i].op) for i in indices)
    c["total"] = len(indices)
    return c


def analyse(text: str, usage: dict, name: str, cold=COLD, show_blocks=False) -> dict:
    instrs = parse_function(text, name)
    blocks, succ = basic_blocks(instrs)
    loop = mma_loop(instrs, blocks, succ)
    rows, groups = {}, collections.defaultdict(list)
    for b in loop:
        groups[cold_group(instrs, blocks[b], cold)].append(b)
    idx = lambda bs: [i for b in bs for i in range(blocks[b][0], blocks[b][1] + 1)]  # noqa: E731
    rows["loop"] = count(instrs, idx(loop))
    rows["steady"] = count(instrs, idx(groups.get(None, [])))
    for g in sorted(k for k in groups if k is not None):
        rows[f"cold: {g}"] = count(instrs, idx(groups[g]))
    spills = sum(1 for ins in instrs if ins.op.split(".")[0] in ("LDL", "STL"))
    use = usage.get(name, {})
    if show_blocks:
        for b in loop:
            s, e = blocks[b]
            fns = collections.Counter(functions_of(instrs[i])[0] if instrs[i].frames else "?"
                                      for i in range(s, e + 1))
            print(f"  block {instrs[s].addr:#06x}-{instrs[e].addr:#06x} {e - s + 1:4d} instr "
                  f"[{cold_group(instrs, blocks[b], cold) or 'steady'}] {dict(fns.most_common(3))}")
    return {"rows": rows, "registers": use.get("REG", -1), "stack_bytes": use.get("STACK", -1),
            "spill_instructions": spills,
            "span": (instrs[blocks[loop[0]][0]].addr, instrs[blocks[loop[-1]][1]].addr)}


def print_table(title: str, result: dict) -> None:
    cols = ("total",) + CLASS_NAMES
    print(f"{title}: {result['registers']} registers, {result['stack_bytes']} B stack (spills), "
          f"{result['spill_instructions']} LDL/STL in the kernel, loop {result['span'][0]:#x}-{result['span'][1]:#x}")
    print("| part | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label, c in result["rows"].items():
        print(f"| {label} | " + " | ".join(str(c.get(k, 0)) for k in cols) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fatbin", type=Path, help="a fatbin, or a folder holding <tree>.fatbin files")
    ap.add_argument("arch", help="sm_89, sm_90, sm_120 ...")
    ap.add_argument("kernels", nargs="+", help="kernel names (the manifest's)")
    ap.add_argument("--blocks", action="store_true", help="list the loop's basic blocks")
    ap.add_argument("--summary", action="store_true", help="one line per kernel (steady state)")
    ap.add_argument("--cold", default=",".join(COLD), help="comma-separated cold functions")
    args = ap.parse_args(argv)
    cold = tuple(x for x in args.cold.split(",") if x)
    texts = {}
    for name in args.kernels:
        path = args.fatbin
        if path.is_dir():
            path = path / f"{name.split('_')[0]}.fatbin"
        if path not in texts:
            texts[path] = disassemble(path, args.arch)
        text, usage = texts[path]
        result = analyse(text, usage, name, cold, args.blocks)
        if args.summary:
            c = result["rows"]["steady"]
            print(f"| {name} | {args.arch} | {result['registers']} | {result['stack_bytes']} | "
                  f"{c['total']} | {c['mma']} | {c['total'] - c['mma']} | {c['int/addr']} | "
                  f"{result['rows']['loop']['total']} |")
        else:
            print_table(f"{name} {args.arch}", result)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
