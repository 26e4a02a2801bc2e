#!/usr/bin/env python3
"""Static SASS statistics of kernels, no GPU needed: compiles a source the way the worker
does (NVRTC 13.0 with kernels/cuda/nvrtc_options.txt, then ptxas for the arch), disassembles
the cubin with nvdisasm and prints per entry point the instruction count, the tensor-core
instructions (HGMMA / HMMA), the wgmma waits (WARPGROUP.DEPBAR: more than one per wgmma
group means ptxas serialised them), exponentials, multiplies, local-memory traffic and the
highest register used. A proxy for issue cost when no GPU is at hand, not a measurement.

Needs the wheels nvrtc_check.py needs, plus nvdisasm (PyPI nvidia-cuda-nvdisasm; any 13.x
disassembles these cubins), e.g. `pip install --target /tmp/nvd 'nvidia-cuda-nvdisasm==13.2.*'`
and `--nvdisasm /tmp/nvd/nvidia/cu13/bin/nvdisasm`.

  python3 kernels/tools/sass_stats.py prefill_wgmma.cu [--arch sm_90] [--match hd128] [--pdl]
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nvrtc_check as nc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source", help="a file in kernels/cuda, e.g. prefill_wgmma.cu")
    ap.add_argument("--arch", default="sm_90", help="device arch (sm_90 builds sm_90a where the worker does)")
    ap.add_argument("--match", default="", help="only entry points containing this")
    ap.add_argument("--pdl", action="store_true", help="the PDL build (-DSOV_PDL=1, worker SOV_PDL=1)")
    ap.add_argument("--nvdisasm", help="nvdisasm to use (default: the wheel's, else the PATH's)")
    a = ap.parse_args()
    cu13 = nc.cu13_root()
    arch = nc.build_arch(a.source, a.arch)
    if arch is None:
        sys.exit(f"sass_stats: {a.source} is not built for {a.arch}")
    nvdisasm = a.nvdisasm or nc.find_nvdisasm(cu13)
    if not nvdisasm:
        sys.exit("sass_stats: no nvdisasm (pip install 'nvidia-cuda-nvdisasm==13.2.*', or --nvdisasm)")
    nvrtc = nc.Nvrtc(cu13 / "lib" / "libnvrtc.so.13")
    options = nc.nvrtc_options(arch) + (["-DSOV_PDL=1"] if a.pdl else [])
    ptx, _log = nvrtc.compile_ptx(nc.program_source(nc.CUDA_DIR / a.source), a.source, options)
    try:
        _entries, sass = nc.ptxas_report(cu13 / "bin" / "ptxas", ptx, arch, nvdisasm)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        sys.exit(f"sass_stats: ptxas or nvdisasm failed ({e})")
    print(f"{a.source} for {arch}")
    for name, text in sass.items():
        if a.match not in name:
            continue
        ops = nc.sass_ops(text)

        def count(pattern):
            return sum(bool(re.search(pattern, o)) for o in ops)
        regs = [int(r) for o in ops for r in re.findall(r"\bR(\d+)\b", o)]
        stats = {
            "instr": len(ops),
            "HGMMA": count(r"HGMMA"),
            "HMMA": count(r"\bHMMA"),
            "wgmma waits": count(r"WARPGROUP\.DEPBAR"),
            "EX2": count(r"MUFU\.EX2"),
            "FMUL": count(r"\bFMUL\b"),
            "local": count(r"\b(LDL|STL)\b"),
            "max R": max(regs or [0]),
        }
        print(f"  {name:40s} " + "  ".join(f"{k} {v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
