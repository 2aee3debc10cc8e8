#!/usr/bin/env python3
"""The occupancy of the flash attention kernels: resident warps per SM on sm_80 (A100) and sm_90 (H100).

  ./flash_occupancy | python3 dev/occupancy.py --arch 90 --ptxas ptxas.log

stdin: dev/flash_occupancy.cu's lines, "precision BF16|FP32", then "kernel D threads dynamic_shared_bytes"
(the launchers' own block sizes). --ptxas: the -Xptxas -v log of the compile that built that
program (registers and static shared memory per kernel). Prints, per kernel and padded head
size D, the registers, shared memory per block (static + dynamic), the blocks per SM that the
registers and the shared memory each allow, and the resident warps per SM; exits 1 if the
flash backward (dk/dv and dq kernels) has fewer than MIN_BACKWARD_WARPS resident warps at D = 64
or 128, or if a kernel of stdin is missing from the log. test/nvcc_gate.sh runs it.

The arithmetic is the CUDA occupancy calculator's (cuda_occupancy.h) for one SM:
  registers: each warp takes regs * 32 rounded up to 256 registers from one of 4 sub-partitions
             of 16384, so blocks = floor(4 floor(16384 / that) / warps per block)
  shared:    each block takes static + dynamic + 1 KiB reserved by the system, rounded up to
             128 bytes, of the SM's 164 KiB (sm_80) or 228 KiB (sm_90) at the largest carveout
  and at most 32 blocks and 64 warps per SM. These are ptxas figures, not a measurement.
"""
import argparse
import re
import sys

# per SM, by architecture: (shared memory bytes at the largest carveout, most per block (opt-in))
SHARED = {80: (164 * 1024, 163 * 1024), 90: (228 * 1024, 227 * 1024)}
REGISTERS, SUB_PARTITIONS, REG_UNIT = 65536, 4, 256
MAX_WARPS, MAX_BLOCKS = 64, 32
RESERVED_SHARED, SHARED_UNIT = 1024, 128
MIN_BACKWARD_WARPS = 8  # the flash backward's resident warps per SM at D = 64 and 128, at least


def ceil_to(x, unit):
    return -(-x // unit) * unit


def blocks_per_sm(arch, regs, warps, shared):
    """(blocks the registers allow, blocks the shared memory allows, resident warps per SM)"""
    per_sm, per_block = SHARED[arch]
    regs_per_warp = ceil_to(max(regs, 1) * 32, REG_UNIT)
    by_regs = SUB_PARTITIONS * (REGISTERS // SUB_PARTITIONS // regs_per_warp) // warps
    by_shared = 0 if shared > per_block else per_sm // ceil_to(shared + RESERVED_SHARED, SHARED_UNIT)
    blocks = min(by_regs, by_shared, MAX_BLOCKS, MAX_WARPS // warps)
    return by_regs, by_shared, blocks * warps


def parse_ptxas(path):
    """{(kernel, D): (registers, static shared bytes)} of the templated kernels of a ptxas -v log"""
    found, name = {}, None
    for line in open(path):
        m = re.search(r"Compiling entry function '(_Z\w+)'", line)
        if m:
            t = re.match(r"_Z\d+(\w+?)ILi(\d+)EE", m.group(1))
            name = (t.group(1), int(t.group(2))) if t else None
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            s = re.search(r"(\d+) bytes smem", line)
            found[name] = (int(m.group(1)), int(s.group(1)) if s else 0)
            name = None
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, choices=sorted(SHARED), required=True)
    ap.add_argument("--ptxas", required=True, help="the -Xptxas -v log of dev/flash_occupancy.cu's compile")
    args = ap.parse_args()
    ptxas = parse_ptxas(args.ptxas)
    precision, rows, problems = "?", [], []
    for line in sys.stdin:
        f = line.split()
        if f[:1] == ["precision"]:
            precision = f[1]
        elif len(f) == 4:
            rows.append((f[0], int(f[1]), int(f[2]), int(f[3])))
    print(f"flash kernels, sm_{args.arch} {precision} (ptxas registers and static shared memory, the launchers' dynamic shared memory):")
    print(f"  {'kernel':<37} {'D':>3} {'warps':>5} {'regs':>4}  {'shared memory per block':>23}  {'blocks by regs/smem':>19}  warps/SM")
    for kernel, D, threads, dynamic in rows:
        if (kernel, D) not in ptxas:
            problems.append(f"{kernel}<{D}> is not in the ptxas log")
            continue
        regs, static = ptxas[(kernel, D)]
        warps = threads // 32
        by_regs, by_shared, resident = blocks_per_sm(args.arch, regs, warps, static + dynamic)
        print(f"  {kernel:<37} {D:>3} {warps:>5} {regs:>4}  {f'{static} + {dynamic} B':>23}  {f'{by_regs} / {by_shared}':>19}  {resident:>8}")
        if "backward" in kernel and D in (64, 128) and resident < MIN_BACKWARD_WARPS:
            problems.append(f"{kernel}<{D}>: {resident} resident warps per SM on sm_{args.arch} {precision}, "
                            f"fewer than {MIN_BACKWARD_WARPS}")
    if not rows:
        problems.append("no kernels on stdin")
    for p in problems:
        print(f"FAIL occupancy: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
