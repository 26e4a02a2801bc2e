#!/usr/bin/env python3
"""Compile every kernel in kernels/cuda/*.cu with NVRTC 13.0 for each target architecture,
exactly as the worker does at run time (same options, same headers), then assemble the
PTX with ptxas -v and report registers, shared memory and spills per entry point.

Exit status 1 on a compile error or warning, or on any spill in a kernel (every kernel here is on
the hot path). Needs no GPU: PyPI nvidia-cuda-nvrtc==13.0.* (libnvrtc) and nvidia-cuda-nvcc==13.0.*
(ptxas). The kernels include no CUDA toolkit header (see kernels/cuda/common.cuh).

  python3 kernels/tools/nvrtc_check.py [--arch sm_80,sm_90] [--json out.json]
"""
import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "cuda"


def cu13_root():
    try:
        import nvidia  # namespace package from the nvidia-* wheels
    except ImportError:
        sys.exit("nvrtc_check: the nvidia-cuda-* 13.0 wheels are not installed "
                 "(pip install 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*' "
                 "'nvidia-cuda-nvcc==13.0.*')")
    for base in nvidia.__path__:
        p = Path(base) / "cu13"
        if (p / "lib" / "libnvrtc.so.13").exists():
            return p
    sys.exit("nvrtc_check: libnvrtc.so.13 not found under the nvidia wheels' cu13/lib")


class Nvrtc:
    def __init__(self, lib_path):
        # NVRTC dlopens its builtins library by name; load it first from the same
        # directory so no LD_LIBRARY_PATH is needed.
        for b in sorted(Path(lib_path).parent.glob("libnvrtc-builtins.so.*")):
            if ".alt." not in b.name:
                ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def version(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return f"{major.value}.{minor.value}"

    def compile_ptx(self, src, name, options):
        prog = ctypes.c_void_p()
        self.check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(),
                                               0, None, None), "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, log)
            if rc != 0:
                return None, log.value.decode(errors="replace")
            self.check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            ptx = ctypes.create_string_buffer(size.value)
            self.check(self.lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            return ptx.value.decode(), log.value.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def nvrtc_options(arch):
    """The options the worker passes to NVRTC (kernels/cuda/nvrtc_options.txt), for PTX
    of `arch` (the worker asks for a cubin of the device's own sm_XX instead)."""
    lines = (CUDA_DIR / "nvrtc_options.txt").read_text().splitlines()
    opts = [l.strip() for l in lines if l.strip() and not l.startswith("#")]
    return [f"--gpu-architecture={arch.replace('sm_', 'compute_')}"] + opts


def build_arch(source, device_arch):
    """As kernels::cuda::build_arch: prefill_wgmma.cu (Hopper wgmma) builds for sm_90a on
    sm_90 only; every other source for the device's own architecture."""
    if source == "prefill_wgmma.cu":
        return "sm_90a" if device_arch == "sm_90" else None
    return device_arch


def program_source(path):
    """The source as the worker compiles it: `#include "common.cuh"` inlined, so the
    kernels need no include path and no CUDA toolkit headers."""
    common = (CUDA_DIR / "common.cuh").read_text()
    return path.read_text().replace('#include "common.cuh"', common)


FUNC = re.compile(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'.*?Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?", re.S)


def ptxas_report(ptxas, ptx, arch, nvdisasm=None):
    """ptxas's per-entry report (registers, spills); with `nvdisasm`, also the cubin's
    SASS split by entry point ({} without)."""
    sass = {}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([str(ptxas), "-v", f"-arch={arch}", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas failed for {arch}:\n{r.stderr}")
        text = r.stderr + r.stdout
        if nvdisasm:
            out = subprocess.run([str(nvdisasm), "-c", str(Path(d) / "k.cubin")], capture_output=True,
                                 text=True, check=True).stdout
            for part in re.split(r"\n(?=\.text\.)", out):
                m = re.match(r"\.text\.(\S+):", part)
                if m:
                    sass[m.group(1)] = part
    # A ptxas warning (e.g. wgmma serialised for a register dependency) fails the check,
    # and so does a "Potential Performance Loss" note, which ptxas prints as info (e.g.
    # C7512: wgmma serialised for lack of registers, C7508: setmaxnreg ignored).
    warnings = [l for l in text.splitlines()
                if "warning" in l.lower() or "potential performance loss" in l.lower()]
    if warnings:
        raise RuntimeError(f"ptxas warnings for {arch}:\n" + "\n".join(warnings))
    entries = {}
    # ptxas prints, per entry: "Compiling entry function 'X' for 'sm_..'", "Function
    # properties for X", "N bytes stack frame, S bytes spill stores, L bytes spill loads",
    # "Used R registers, ... B bytes smem ...".
    blocks = re.split(r"ptxas info\s*: Compiling entry function ", text)[1:]
    for b in blocks:
        name = re.match(r"'(\S+)'", b).group(1)
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", b)
        regs = re.search(r"Used (\d+) registers", b)
        smem = re.search(r"(\d+) bytes smem", b)
        entries[name] = {
            "registers": int(regs.group(1)) if regs else None,
            "smem_bytes": int(smem.group(1)) if smem else 0,
            "stack_bytes": int(spill.group(1)) if spill else 0,
            "spill_stores": int(spill.group(2)) if spill else 0,
            "spill_loads": int(spill.group(3)) if spill else 0,
        }
    return entries, sass


def find_nvdisasm(cu13):
    """nvdisasm from NVIDIA's wheel (nvidia-cuda-nvdisasm) or the PATH, or None."""
    p = cu13 / "bin" / "nvdisasm"
    return p if p.exists() else shutil.which("nvdisasm")


def sass_ops(text):
    """An entry's SASS instructions (as `ptxas_report` splits them), addresses stripped."""
    return [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", line).split(";")[0].strip()
            for line in text.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]


def pdl_order_errors(sass):
    """Where a PDL build's SASS breaks the order its code needs: every entry waits
    (griddepcontrol.wait: ACQBULK), and a GEMV (its weights) and decode attention (the
    K/V rows of earlier steps) issue loads before it (ptxas moves the wait ahead of
    `ld.global.nc` loads, so the pre-wait loads must be plain ones)."""
    errors = []
    for name, text in sass.items():
        ops = sass_ops(text)
        wait = next((i for i, o in enumerate(ops) if "ACQBULK" in o), None)
        if wait is None:
            errors.append(f"{name}: no griddepcontrol.wait (ACQBULK) in the PDL build")
        elif (name.startswith("gemv") or name.startswith("decode_attention_hd") or name == "pdl_probe") \
                and not any("LDG" in o for o in ops[:wait]):
            errors.append(f"{name}: no load issued before griddepcontrol.wait")
    return errors


def setmaxnreg_errors(ptx, entries):
    """Entries whose `setmaxnreg` cannot be satisfied: the register pool is the CTA's
    (threads x launch registers); a kernel of W warpgroups whose one producer warpgroup
    drops to `dec` registers and whose W - 1 consumer warpgroups rise to `inc` needs
    ((W - 1) inc + dec) / W registers a thread at launch, or the consumers'
    `setmaxnreg.inc` waits for registers forever (a hang no bounded wait catches)."""
    errors = []
    for part in re.split(r"(?=\.entry\s)", ptx)[1:]:
        name = re.match(r"\.entry\s+(\S+?)\s*\(", part).group(1)
        inc = re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", part)
        if not inc:
            continue
        dec = re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+)", part)
        ntid = re.search(r"\.maxntid\s+(\d+)", part)
        if not dec or not ntid or int(ntid.group(1)) % 128:
            errors.append(f"{name}: setmaxnreg.inc without a decreasing producer warpgroup "
                          "or whole warpgroups in __launch_bounds__")
            continue
        w = int(ntid.group(1)) // 128
        need = -(-((w - 1) * int(inc.group(1)) + int(dec.group(1))) // w)
        have = (entries.get(name) or {}).get("registers") or 0
        if have < need:
            errors.append(f"{name}: launched with {have} registers a thread, but setmaxnreg "
                          f"{dec.group(1)}/{inc.group(1)} over {w} warpgroups needs {need}")
    return errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_80,sm_90")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    cu13 = cu13_root()
    nvrtc = Nvrtc(cu13 / "lib" / "libnvrtc.so.13")
    ptxas = cu13 / "bin" / "ptxas"
    if not ptxas.exists():
        sys.exit(f"nvrtc_check: ptxas not found at {ptxas} (pip install 'nvidia-cuda-nvcc==13.0.*')")
    sources = sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        sys.exit(f"nvrtc_check: no kernels in {CUDA_DIR}")
    print(f"NVRTC {nvrtc.version()}, {len(sources)} sources, archs {args.arch}", flush=True)
    report, failed = {}, False
    # Every source as the worker builds it by default, and on sm_90+ also the PDL build of
    # those with PDL code (worker SOV_PDL=1: kernels::cuda::PDL_DEFINE), whose SASS is
    # checked for the order of its loads and waits where nvdisasm is installed.
    nvdisasm = find_nvdisasm(cu13)
    if not nvdisasm:
        print("nvrtc_check: no nvdisasm (pip install 'nvidia-cuda-nvdisasm==13.2.*'): "
              "the PDL builds' SASS order is NOT checked", flush=True)
    builds = []
    for device_arch in args.arch.split(","):
        builds += [(device_arch, src, False) for src in sources]
        if int(device_arch.split("_")[1]) >= 90:
            builds += [(device_arch, src, True) for src in sources if "pdl_wait();" in src.read_text()]
    for device_arch, src, pdl in builds:
        arch = build_arch(src.name, device_arch)
        if arch is None:
            continue
        label = f"{arch}+pdl" if pdl else arch
        options = nvrtc_options(arch) + (["-DSOV_PDL=1"] if pdl else [])
        ptx, log = nvrtc.compile_ptx(program_source(src), src.name, options)
        if ptx is None:
            print(f"FAIL {src.name} [{label}]: NVRTC compile error\n{log}", flush=True)
            failed = True
            continue
        if log.strip():
            # Warnings fail the check too (like clippy -D warnings).
            print(f"FAIL {src.name} [{label}]: compiler warnings\n{log.strip()}")
            failed = True
        try:
            entries, sass = ptxas_report(ptxas, ptx, arch, nvdisasm if pdl else None)
        except RuntimeError as e:
            print(f"FAIL {src.name} [{label}]: {e}", flush=True)
            failed = True
            continue
        for err in pdl_order_errors(sass) + setmaxnreg_errors(ptx, entries):
            print(f"FAIL {src.name} [{label}]: {err}", flush=True)
            failed = True
        for name, e in sorted(entries.items()):
            spills = e["spill_stores"] + e["spill_loads"]
            status = "SPILL" if spills else "ok"
            if spills:
                failed = True
            print(f"{status:5} {label} {src.name}:{name} regs={e['registers']} smem={e['smem_bytes']} "
                  f"stack={e['stack_bytes']} spill_st={e['spill_stores']} spill_ld={e['spill_loads']}")
            report[f"{label}/{src.name}/{name}"] = e
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True))
    print("nvrtc_check:", "FAILED" if failed else f"{len(report)} kernel builds, no spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
