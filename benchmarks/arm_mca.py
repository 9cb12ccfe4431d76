"""Speed on paper for ARM servers: the float32 Adam inner loop's throughput per element, from
llvm-mca's scheduling models of Neoverse N1 (AWS Graviton 2), V1 (Graviton 3) and V2 (NVIDIA
Grace), for fastadam's NEON and SVE variants as the wheels build them (Debian's aarch64 GCC,
the setup.py flags) and, with --deepspeed, for DeepSpeed's CPU Adam NEON and SVE loops built the
same way; then the memory roofline of each chip from its published bandwidth.

    python benchmarks/arm_mca.py --deepspeed <DeepSpeed source tree (csrc/)>

Needs aarch64-linux-gnu-g++ and llvm-mca-19 (Debian: g++-aarch64-linux-gnu, llvm-19); with
--deepspeed, torch (for its headers) and Debian's libpython3.11-dev:arm64.  The
loop llvm-mca reads is the innermost loop of the compiled function that holds the square root;
an iteration's elements are its vector square roots times the lanes (4 for NEON's 128 bits; an
SVE vector's length on that CPU).  llvm-mca assumes every load hits L1: the figures are the
core's limit, which the roofline then compares with memory's.
"""
import argparse
import os
import re
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (llvm-mca's -mcpu, the chip, SVE vector bits (0: none), cores, GHz, DRAM GB/s as published)
CHIPS = [
    ("neoverse-n1", "AWS Graviton 2", 0, 64, 2.5, 204.8),   # 8 channels DDR4-3200
    ("neoverse-v1", "AWS Graviton 3", 256, 64, 2.6, 307.2),  # 8 channels DDR5-4800
    ("neoverse-v2", "NVIDIA Grace (one die of GH200)", 128, 72, 3.1, 500.0),  # LPDDR5X, up to ~500 GB/s
]
BYTES_PER_ELEMENT = 28  # float32 Adam: read p, g, m, v; write p, m, v

FASTADAM = r"""
#include "adam_kernel.hpp"
// Adam, float32 parameters, gradients and state: the row and code fa_dispatch.hpp runs for it.
typedef fa_param_plain<fa_f32> P;
constexpr int CODE = fa_loop_code(FA_WD_NONE, fa_row<P, fa_f32, FA_STORAGE_NATIVE>::compiled);
void fastadam_neon(const fa_item &it, int64_t a, int64_t b) {
    fa_adam_loop<P, fa_f32, CODE, FA_STORAGE_NATIVE, FA_ISA_BASELINE>(it, a, b);
}
FA_SVE_TARGET void fastadam_sve(const fa_item &it, int64_t a, int64_t b) {
    fa_adam_loop<P, fa_f32, CODE, FA_STORAGE_NATIVE, FA_ISA_SVE>(it, a, b);
}
"""

DEEPSPEED = r"""
#include "cpu_adam.h"
#if defined(__ARM_FEATURE_SVE)
void deepspeed_sve(float *p, const float *g, float *m, float *v, size_t n) {
    sve_adam_update<1>(p, g, m, v, n, 0.9f, 0.999f, 0.9f, 0.03f, 1e-8f, 1e-3f, 0.01f, true, false);
}
#else
void deepspeed_neon(Adam_Optimizer &opt, size_t *rounded, float *p, float *g, float *m, float *v, size_t n) {
    opt.Step_AVX<1>(rounded, p, g, m, v, n, false);
}
#endif
"""


def compile_to_assembly(source, flags, tmp, name):
    path = os.path.join(tmp, name + ".cpp")
    with open(path, "w") as f:
        f.write(source)
    out = os.path.join(tmp, name + ".s")
    subprocess.run(["aarch64-linux-gnu-g++", "-S", "-o", out, path, *flags], check=True)
    with open(out) as f:
        return f.read()


def function_body(assembly, symbol):
    """The lines of `symbol`'s body (mangled or not)."""
    lines = assembly.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^_?Z?\S*{symbol}\S*:$", line.strip()))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(".size"))
    return lines[start:end]


BRANCH = re.compile(r"^\s*(b\.?(?:eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|any|none|first|nfrst|last|"
                    r"plast)|cbnz|cbz|tbnz|tbz|b)\s+(?:\S+,\s*)*(\.?L\w+)$")


def hottest_loop(body, sve_bits=256):
    """The loop (a branch back to a label) whose square roots are the widest, the shortest of
    those, as llvm-mca's input: its straight-line path, every other branch in it taken as not
    taken (the rare options, such as DeepSpeed's weight decay)."""
    labels = {line.strip()[:-1]: i for i, line in enumerate(body) if re.match(r"^\.?L\w+:$", line.strip())}
    backward = [(labels[m.group(2)], i) for i, line in enumerate(body)
                if (m := BRANCH.match(line)) and m.group(2) in labels
                and labels[m.group(2)] < i]
    loops = []
    for start, end in backward:
        block = [l for l in body[start + 1:end] if l.strip() and not l.strip().startswith(".")
                 and not l.strip().endswith(":") and not BRANCH.match(l)] + [body[end]]
        if any(l.split()[0] == "fsqrt" for l in block):
            loops.append(block)
    if not loops:
        raise RuntimeError("no loop with a square root found")
    return max(loops, key=lambda block: (lanes_per_sqrt(block, sve_bits) / sum(
        l.split()[0] == "fsqrt" for l in block), -len(block)))


def lanes_per_sqrt(block, sve_bits):
    sqrts = [l for l in block if l.split()[0] == "fsqrt"]
    total = 0
    for l in sqrts:
        if ".4s" in l:
            total += 4
        elif re.search(r"\bz\d+\.s\b", l):
            total += sve_bits // 32
        else:
            total += 1
    return total


def mca(block, cpu, mca_tool):
    text = "\n".join(l.strip() for l in block) + "\n"
    out = subprocess.run([mca_tool, "-mtriple=aarch64-linux-gnu", f"-mcpu={cpu}", "-iterations=200"],
                         input=text, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Block RThroughput:\s*([\d.]+)", out).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepspeed", help="a DeepSpeed source tree (its csrc/includes is used)")
    parser.add_argument("--mca", default="llvm-mca-19")
    args = parser.parse_args()
    loops = {}
    common = ["-std=c++17", "-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]  # setup.py's
    with tempfile.TemporaryDirectory() as tmp:
        asm = compile_to_assembly(FASTADAM, common + ["-I", os.path.join(REPO, "src")], tmp, "fastadam")
        loops["fastadam NEON"] = (hottest_loop(function_body(asm, "fastadam_neon")), False)
        loops["fastadam SVE"] = (hottest_loop(function_body(asm, "fastadam_sve")), True)
        if args.deepspeed:
            include = os.path.join(args.deepspeed, "csrc", "includes")
            # cpu_adam.h includes torch/extension.h: torch's headers (any platform's: they are
            # the same) and CPython's for aarch64 (Debian's libpython3.11-dev:arm64)
            from torch.utils.cpp_extension import include_paths
            torch_includes = [f"-I{path}" for path in include_paths()]
            ds = ["-std=c++17", "-O3", "-fopenmp", "-I", include, *torch_includes,
                  "-I/usr/include/python3.11"]  # Debian's pyconfig.h picks the target's
            asm = compile_to_assembly(DEEPSPEED, ds + ["-D__NEON__", "-march=armv8.2-a"], tmp, "ds_neon")
            # (the loops are in OpenMP's outlined functions: the whole file, which holds no other)
            loops["DeepSpeed NEON"] = (hottest_loop(asm.splitlines()), False)
            asm = compile_to_assembly(DEEPSPEED, ds + ["-D__SVE__", "-march=armv8.2-a+sve"], tmp, "ds_sve")
            loops["DeepSpeed SVE"] = (hottest_loop(asm.splitlines()), True)
    print(f"float32 Adam, cycles per element on one core (llvm-mca {args.mca}, L1-resident), "
          f"and the chip's limit in G elements/s: all cores at that rate, or memory at "
          f"{BYTES_PER_ELEMENT} bytes an element")
    print(f"{'loop':16s} {'instr':>5s} " + " ".join(f"{cpu:>22s}" for cpu, *_ in CHIPS))
    for name, (block, sve) in loops.items():
        cells = []
        for cpu, chip, sve_bits, cores, ghz, bandwidth in CHIPS:
            if sve and not sve_bits:
                cells.append(f"{'(no SVE)':>22s}")
                continue
            lanes = lanes_per_sqrt(block, sve_bits if sve else 128)
            cycles = mca(block, cpu, args.mca) / lanes
            compute = cores * ghz / cycles
            cells.append(f"{cycles:6.2f} c/el {compute:6.1f} G/s".rjust(22))
        print(f"{name:16s} {len(block):5d} " + " ".join(cells))
    print(f"{'memory roofline':22s} " + " ".join(
        f"{bandwidth / BYTES_PER_ELEMENT:6.1f} G/s ({bandwidth:.0f} GB/s)".rjust(22)
        for cpu, chip, sve_bits, cores, ghz, bandwidth in CHIPS))
    print("chips: " + "; ".join(f"{cpu} = {chip}, {cores} cores at {ghz} GHz, SVE "
                                 f"{sve_bits or 'none'}{'-bit' if sve_bits else ''}"
                                 for cpu, chip, sve_bits, cores, ghz, bandwidth in CHIPS))


if __name__ == "__main__":
    main()
