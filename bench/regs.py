"""Registers and spills of our flash kernels for the H100 (sm_90a), without a GPU.

  pip install --target /tmp/tritonpkg triton==3.6.0     # once: Triton with its own ptxas (~650 MB)
  python -m bench.regs [--causal] [--varlen] [--dropout P] [--landmark] [--d 128] [--sass]
                       [--tiles QxKwWsS,QxKwWsS,QxKwWsS] [--triton /tmp/tritonpkg]

jax lowers each pallas_call to Triton IR for CUDA on the CPU; this captures that IR, compiles it in
a second process with the Triton found under --triton (jaxlib and Triton each carry their own MLIR,
so they stay in separate processes) through the passes XLA runs, and runs Triton's ptxas -v on the
PTX. It prints each kernel's registers per thread, spill bytes, shared memory and how many times
ptxas serialized a wgmma (warnings C7515/C7519); --sass adds static SASS instruction counts by kind
(integer, float, MUFU, local and shared memory, barriers), which is how the dropout hash's cost and
any layout conversion show up. SASS_DUMP=PREFIX keeps each kernel's disassembly, REGS_KEEP=DIR
its Triton IR and PTX.

At (4, 16, 4096, 128) bf16: forward 255 registers with 32 bytes of spills, dQ 173 registers, dK/dV
254; Nsight Compute on the H100 read 255 / 168 / 254 (2026-11-27; XLA builds its own Triton). The
varlen forward spilled 248 bytes, 26 spill instructions inside its main loop where the dense one had
none, while its epilogue reused the Q load's per-row offsets and row tests: derived from lengths
read from memory, ptxas could not recompute them and kept them through the loop. Reading the
lengths again after the loop brings it to 48 bytes, none inside the main loop.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import subprocess
import sys
import tempfile

_COMPILE = r'''
import glob, os, re, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
ptxas = glob.glob(sys.argv[1] + "/triton/backends/nvidia/bin/ptxas*")[0]
from triton._C.libtriton import ir
from triton.backends.nvidia.compiler import CUDABackend
for spec in [a for a in sys.argv[2:] if a != "--sass"]:
  path, warps, stages = spec.rsplit(":", 2)
  # A .ttir source skips Triton's make_ttir passes (canonicalize, combine, ...); XLA runs them
  # (its CreateTritonPipeline starts with them), so run them here too: without combine, a dot added
  # to an accumulator keeps a second accumulator's worth of registers.
  context = ir.context()
  ir.load_dialects(context)
  mod = ir.parse_mlir_module(path, context)
  mod.context = context
  CUDABackend.make_ttir(mod, {}, None, 90)
  path = path + ".combined.ttir"
  with open(path, "w") as f:
    f.write(str(mod))
  t0 = time.perf_counter()
  k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=int(warps), num_stages=int(stages)))
  t1 = time.perf_counter()  # Triton's passes and its own ptxas run to a cubin
  with open(path + ".ptx", "w") as f:
    f.write(k.asm["ptx"])
  out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path + ".ptx", "-o", path + ".cubin"],
                       capture_output=True, text=True).stderr
  t2 = time.perf_counter()
  ptx_lines = k.asm["ptx"].count("\n")
  # C7519: ptxas had to insert a warpgroup.arrive so that a wgmma could use registers: its
  # asynchronous matrix products are serialized there.
  # C7515: serialized because other instructions sit inside a wgmma pipeline stage.
  waits = sum("C7519" in l or "C7515" in l for l in out.splitlines())
  info = " | ".join(l.split(":", 1)[-1].strip() for l in out.splitlines()
                    if ("registers" in l or "spill" in l) and "C75" not in l)
  sass = ""
  if sys.argv[-1] == "--sass":
    dis = subprocess.run([glob.glob(sys.argv[1] + "/triton/backends/nvidia/bin/cuobjdump")[0], "-sass",
                          path + ".cubin"], capture_output=True, text=True).stdout
    # "/*0450*/ @!P0 LDGSTS.E.BYPASS.128 [...] ;" -> "LDGSTS.E.BYPASS.128"
    ops = [re.sub(r"^@!?U?P[T0-9]+\s+", "", l.split("*/", 1)[1].strip()).split()[0]
           for l in dis.splitlines() if "*/" in l and ";" in l]
    if os.environ.get("SASS_DUMP"):
      open(os.environ["SASS_DUMP"] + "." + path.rsplit("/", 1)[-1] + ".sass", "w").write(dis)
    count = lambda *names: sum(o.split(".")[0] in names for o in ops)
    ints = count("IMAD", "IADD3", "LOP3", "SHF", "ISETP", "LEA", "IMNMX", "SEL")
    sass = (f" | SASS {len(ops)} instr: int {ints}"
            f" fp {count('FMUL', 'FADD', 'FFMA', 'FMNMX', 'FSEL', 'FSETP')} mufu {count('MUFU')}"
            f" local {count('LDL', 'STL')} shared {count('LDS', 'STS', 'LDSM', 'STSM')} bar {count('BAR')}")
  print(path, warps, stages,
        f"{info} | shared {k.metadata.shared // 1024} KiB | wgmma waits inserted: {waits}"
        f" | compile {t1 - t0:.1f} s, ptxas -v {t2 - t1:.1f} s, PTX {ptx_lines} lines{sass}",
        flush=True)
'''


def dump(args, out_dir: str) -> list[tuple[str, str]]:
  """Lowers one forward+backward for CUDA; returns (kernel name, .ttir path) per pallas_call."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.triton import pallas_call_registration as registration  # pylint: disable=import-outside-toplevel

  import pallas_attn as pa  # pylint: disable=import-outside-toplevel
  from bench.options import VARLEN_LENGTHS, mixed_varlen  # pylint: disable=import-outside-toplevel
  from bench.providers import parse_tiles  # pylint: disable=import-outside-toplevel

  found = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    res = lower(*a, **k)
    name = res.module.operation.attributes["sym_name"].value
    path = os.path.join(out_dir, f"{len(found)}_{name}.ttir")
    with open(path, "w") as f:
      f.write(res.module.operation.get_asm(enable_debug_info=False))
    found.append((name, path))
    return res

  registration.lowering.lower_jaxpr_to_triton_module = capture
  tiles = parse_tiles(args.tiles)[1] if args.tiles else None
  h, d = 16, args.d
  if args.landmark:
    from bench.landmark import required_is_mem  # pylint: disable=import-outside-toplevel
    x = jnp.zeros((2, h, 8192, d), args.dtype)
    attend = lambda q, k, v: pa.fused_landmark_attention(q, k, v, required_is_mem(8192, args.block_size),
                                                         block_size=args.block_size, tiles=tiles)
  elif args.varlen:
    x = jnp.zeros((1, sum(VARLEN_LENGTHS), h, d), jnp.bfloat16)
    attend = mixed_varlen(args.causal, tiles)
  else:
    x = jnp.zeros((4, 4096, h, d), args.dtype)
    attend = lambda q, k, v: pa.flash_attn_func(q, k, v, dropout_p=args.dropout, causal=args.causal,
                                                tiles=tiles, dropout_key=jax.random.PRNGKey(0))

  def step(q, k, v, do):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(do)

  try:
    jax.jit(step).trace(x, x, x, x).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
  return found


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--causal", action="store_true")
  ap.add_argument("--varlen", action="store_true", help="bench.options' mixed lengths, 16384 tokens")
  ap.add_argument("--d", type=int, default=128)
  ap.add_argument("--landmark", action="store_true", help="landmark attention, (2, 16, 8192, d)")
  ap.add_argument("--block-size", type=int, default=64, help="landmark block size")
  ap.add_argument("--dtype", default="bfloat16", help="input dtype (dense and landmark runs)")
  ap.add_argument("--dropout", type=float, default=0.0, help="dropout_p (dense runs only)")
  ap.add_argument("--sass", action="store_true", help="also count SASS instructions by kind (static)")
  ap.add_argument("--tiles", default=None, help="fwd,dq,dkv tiles as bench.run's --ours-tiles")
  ap.add_argument("--triton", default="/tmp/tritonpkg", help="where `pip install --target` put Triton")
  args = ap.parse_args(argv)
  if not glob.glob(os.path.join(args.triton, "triton", "backends", "nvidia", "bin", "ptxas*")):
    raise SystemExit(f"no Triton with ptxas under {args.triton}: pip install --target {args.triton} "
                     "triton==3.6.0")
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from pallas_attn import tiles as tiles_mod  # pylint: disable=import-outside-toplevel
  from bench.providers import parse_tiles  # pylint: disable=import-outside-toplevel
  dp = max(16, 1 << (args.d - 1).bit_length())
  cfgs = (parse_tiles(args.tiles)[1] if args.tiles
          else tiles_mod.resolve(dp, 4096, 4096, itemsize=jnp.dtype(args.dtype).itemsize))
  if args.landmark:
    from pallas_attn.backends import triton_landmark  # pylint: disable=import-outside-toplevel
    cfgs = triton_landmark.configs(triton_landmark.LandmarkSpec(sq=8192, sk=8192, block_size=args.block_size,
                                                                scale=args.d ** -0.5), dp,
                                   jnp.dtype(args.dtype).itemsize,
                                   cfgs if args.tiles else None)
  keep = os.environ.get("REGS_KEEP")  # a folder to keep the .ttir/.ptx/.cubin in
  if keep:
    os.makedirs(keep, exist_ok=True)
  with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory()) as tmp:
    kernels = dump(args, tmp)
    # fwd, dq, dkv in launch order, as the configs list them.
    specs = [f"{path}:{c.num_warps}:{c.num_stages}"
             for (_, path), c in zip(kernels, (cfgs.fwd, cfgs.bwd_dq, cfgs.bwd_dkv))]
    res = subprocess.run([sys.executable, "-c", _COMPILE, args.triton, *specs,
                          *(["--sass"] if args.sass else [])], capture_output=True,
                         text=True, check=False)
    if res.returncode:
      raise SystemExit(res.stderr[-2000:])
    for line, (name, _) in zip(res.stdout.splitlines(), kernels):
      _, warps, stages, info = line.split(" ", 3)
      print(f"{name:28s} w{warps} s{stages}  {info}")


if __name__ == "__main__":
  main()
