#!/usr/bin/env python3
"""Where a kernel's warps stall, by opcode and reason, from Nsight Compute's per-instruction
source counters.

    ncu -k regex:sm90_qkint8 -c 1 --section WarpStateStats --section SourceCounters -o rep python call.py
    ncu -i rep.ncu-rep --page source --print-source sass --csv > src.csv
    python tools/ncu_stalls.py src.csv --loop            # the steady loop only
    python tools/ncu_stalls.py src.csv --range 1600 2830 --top 30

Prints markdown: the stall reasons' shares of the sampled region, a table by opcode (the SASS
mnemonic's first word, predicate dropped: its instructions, share of the samples, main reasons)
and the instructions with the most samples. Samples whose reason the export has no column for
count as "(unnamed)". `--loop` takes the span from the first to the last instruction that
shares the execution count holding the most samples: a kernel's main loop. Standard library
only; reads the first kernel of the export unless --kernel names one.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys
from dataclasses import dataclass, field

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
UNNAMED = "(unnamed)"


@dataclass
class Instruction:
    index: int
    address: str
    source: str
    samples: int
    executed: int
    reasons: dict = field(default_factory=dict)  # stall reason (no "stall_") -> samples

    @property
    def opcode(self) -> str:
        words = self.source.split()
        if words and words[0].startswith("@"):  # predicate guard
            words = words[1:]
        return words[0].split(".")[0] if words else ""


def _int(text: str) -> int:
    text = text.strip().replace(",", "")
    return int(float(text)) if text else 0


def read_kernels(path: str) -> dict:
    """{kernel name: [Instruction]} of an `ncu --page source --csv` export."""
    kernels, name, header = {}, None, None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                name, header = row[1], None
                kernels[name] = []
            elif header is None:
                header = {h: i for i, h in enumerate(row)}
                missing = [c for c in ("Address", "Source", SAMPLES, EXECUTED) if c not in header]
                if missing:
                    raise ValueError(f"{path}: no column {missing[0]!r} (export with --page source --csv)")
                stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
            elif name is not None and len(row) >= len(header):
                samples = _int(row[header[SAMPLES]])
                reasons = {h[len("stall_"):]: _int(row[header[h]]) for h in stalls}
                named = sum(reasons.values())
                # Samples whose reason has no column in the export (on Hopper most of those at
                # wgmma issue): counted under their own name so the reasons add up.
                if samples > named:
                    reasons[UNNAMED] = samples - named
                kernels[name].append(Instruction(len(kernels[name]), row[header["Address"]],
                                                 row[header["Source"]].strip(), samples,
                                                 _int(row[header[EXECUTED]]), reasons))
    if not kernels:
        raise ValueError(f"{path}: no 'Kernel Name' line: not an ncu source-page export")
    return kernels


def loop_span(instructions: list) -> tuple:
    """First and last index of the instructions that share the execution count holding the
    most stall samples: a steady loop body runs each of its instructions equally often (a
    spin-wait runs more often, but holds few samples)."""
    by_count = collections.Counter()
    for i in instructions:
        if i.executed:
            by_count[i.executed] += i.samples
    if not by_count:
        return 0, len(instructions) - 1
    count = by_count.most_common(1)[0][0]
    hot = [i.index for i in instructions if i.executed == count]
    return hot[0], hot[-1]


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _top_reasons(counter, whole: int, n: int = 3) -> str:
    return ", ".join(f"{k} {_share(v, whole)}" for k, v in counter.most_common(n) if v)


def report(name: str, instructions: list, first: int, last: int, top: int) -> str:
    region = [i for i in instructions if first <= i.index <= last]
    total = sum(i.samples for i in instructions)
    samples = sum(i.samples for i in region)
    reasons = collections.Counter()
    by_op = collections.defaultdict(collections.Counter)
    count, op_samples = collections.Counter(), collections.Counter()
    for i in region:
        reasons.update(i.reasons)
        by_op[i.opcode].update(i.reasons)
        count[i.opcode] += 1
        op_samples[i.opcode] += i.samples
    out = [f"### {name}", "",
           f"Instructions {first}..{last} of {len(instructions)}: {samples} of {total} stall samples "
           f"({_share(samples, total)}).", "",
           "Reasons: " + ", ".join(f"{k} {_share(v, samples)}" for k, v in reasons.most_common() if v), "",
           "| opcode | instructions | samples | main reasons |", "|---|---|---|---|"]
    for op, s in op_samples.most_common():
        out.append(f"| {op} | {count[op]} | {_share(s, samples)} | {_top_reasons(by_op[op], samples)} |")
    out += ["", "| index | address | samples | instruction | main reasons |", "|---|---|---|---|---|"]
    for i in sorted(region, key=lambda i: -i.samples)[:top]:
        out.append(f"| {i.index} | {i.address} | {_share(i.samples, samples)} | `{i.source}` | "
                   f"{_top_reasons(collections.Counter(i.reasons), samples)} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu -i REP --page source --print-source sass --csv > FILE")
    ap.add_argument("--kernel", help="the kernel's name in the export (default: the first)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--loop", action="store_true", help="only the loop holding the most samples (see above)")
    where.add_argument("--range", nargs=2, type=int, metavar=("FIRST", "LAST"),
                       help="only instructions FIRST..LAST (indices as printed)")
    ap.add_argument("--top", type=int, default=20, help="instructions listed (default 20)")
    args = ap.parse_args(argv)
    try:
        kernels = read_kernels(args.csv)
    except (OSError, ValueError) as e:
        print(f"ncu_stalls: {e}", file=sys.stderr)
        return 2
    name = args.kernel or next(iter(kernels))
    if name not in kernels:
        print(f"ncu_stalls: no kernel {name!r} in {args.csv} (has: {', '.join(kernels)})", file=sys.stderr)
        return 2
    instructions = kernels[name]
    if args.loop:
        first, last = loop_span(instructions)
    elif args.range:
        first, last = args.range
    else:
        first, last = 0, len(instructions) - 1
    print(report(name, instructions, first, last, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
