"""Benchmark our attention kernels against their peers, side by side in one process.

  python -m bench.run [--set NAME ...] [--smoke] [--out DIR] [--providers NAME ...] [--time-limit S]

Every provider's output is first checked against the float32 reference (bench/inputs.py); one that
disagrees is reported and not timed. Results: a table on stdout (printed last), DIR/results.json,
DIR/table.txt and DIR/tflops_<set>.png. See bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import os
import platform as _platform
import subprocess
import sys
import time
import traceback
from collections import OrderedDict

import jax

from bench import cases as cases_mod
from bench import providers as prov_mod
from bench import report, timing
from bench.inputs import CHECK_ROWS, FACTOR, FLOOR, Inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "out")
VERSION_DISTS = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                 "jax-cuda13-pjrt", "torch", "triton", "pytorch-triton", "tokamax", "numpy", "ml_dtypes",
                 "matplotlib", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")


def _share_gpu_memory() -> None:
  """jax and torch share the GPU in this process: jax must not grab 75% of it up front, and its pool is
  capped so that torch's caching allocator keeps room. Both yield to the user's own settings (jax
  refuses XLA_CLIENT_MEM_FRACTION next to its deprecated XLA_PYTHON_ spelling, so only one is set).
  Read when jax's GPU backend starts, so this runs before the first jax.devices().
  """
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if "XLA_CLIENT_MEM_FRACTION" not in os.environ and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
    os.environ["XLA_CLIENT_MEM_FRACTION"] = "0.45"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
  p.add_argument("--set", dest="sets", nargs="+", action="extend", choices=cases_mod.ALL_SETS, metavar="NAME",
                 help=f"shape sets to run: {', '.join(cases_mod.ALL_SETS)} (default: "
                      f"{' '.join(cases_mod.DEFAULT_SETS)}; with --smoke: smoke)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes on the CPU (Pallas interpret mode), ours and the XLA reference only")
  p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: bench/out)")
  p.add_argument("--providers", nargs="+", action="extend", metavar="NAME",
                 help="run only these providers (default: all but xla-reference; with --smoke: "
                      f"{' '.join(prov_mod.SMOKE_PROVIDERS)})")
  p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="NAME",
                 help="drop these providers")
  p.add_argument("--ours-tiles", action="append", default=[], metavar="SPEC",
                 help="also time our JAX face with these tiles: 'QxKwWsS,QxKwWsS,QxKwWsS' for fwd, dq, dkv "
                      "(e.g. 128x64w4s2,64x64w4s2,64x64w4s2); repeatable")
  p.add_argument("--time-limit", type=float, default=0.0, metavar="S",
                 help="stop starting new measurements after S seconds (rows left are marked skipped); "
                      "0 = no limit")
  p.add_argument("--only", nargs="+", action="extend", default=[], metavar="FIELD=V[,V]",
                 help="keep cases whose field matches, e.g. --only d=128 dtype=bf16 causal=1 sq=4096,8192 "
                      "(fields of bench.cases.Case)")
  p.add_argument("--allow-cpu", action="store_true", help="run non-smoke sets even when jax sees no GPU")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--jax-cache", metavar="DIR", help="jax persistent compilation cache directory")
  args = p.parse_args(argv)
  if not args.sets:
    args.sets = ["smoke"] if args.smoke else list(cases_mod.DEFAULT_SETS)
  args.sets = list(OrderedDict.fromkeys(args.sets))
  return args


def _case_filter(specs):
  """--only FIELD=V[,V] -> predicate over cases (values compared as text; bools as 0/1; bf16/fp16/fp32)."""
  fields = {f.name for f in dataclasses.fields(cases_mod.Case)}
  alias = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "true": "1", "false": "0", "yes": "1",
           "no": "0"}
  conds = []
  for spec in specs:
    name, sep, vals = spec.partition("=")
    if not sep or name not in fields:
      raise SystemExit(f"--only: expected FIELD=V[,V] with FIELD one of {', '.join(sorted(fields))}, "
                       f"got {spec!r}")
    conds.append((name, {alias.get(v.lower(), v) for v in vals.split(",")}))

  def text(x):
    return str(int(x)) if isinstance(x, bool) else str(x)
  return lambda case: all(text(getattr(case, n)) in vs for n, vs in conds)


def _select_providers(args) -> list[prov_mod.Provider]:
  try:
    tiles = [prov_mod.parse_tiles(s) for s in args.ours_tiles]
  except ValueError as e:
    raise SystemExit(str(e)) from None
  provs = prov_mod.registry(tiles)
  names = [p.name for p in provs]
  for n in (args.providers or []) + args.exclude:
    if n not in names:
      raise SystemExit(f"--providers/--exclude: unknown provider {n!r}; known: {', '.join(names)}")
  if args.providers:
    wanted = set(args.providers) | {p.name for p in provs if p.name.startswith(prov_mod.OURS + "@")}
  elif args.smoke:
    wanted = set(prov_mod.SMOKE_PROVIDERS) | {p.name for p in provs if p.name.startswith(prov_mod.OURS + "@")}
  else:
    wanted = set(names) - set(prov_mod.DEFAULT_EXCLUDED)
  wanted -= set(args.exclude)
  return [p for p in provs if p.name in wanted]


class Bench:
  """Runs cases x directions x providers, collecting one measurement per (problem, direction, provider)."""

  def __init__(self, args, providers, platform: str, device):
    self.args = args
    self.providers = providers
    self.platform = platform
    self.device = device
    self.tcfg = timing.SMOKE_TIMING if args.smoke else timing.TimingConfig()
    self.t_start = time.perf_counter()
    self.results: dict[tuple, dict] = {}
    self.wall_by_provider: dict[str, float] = {}
    self.reference_s = 0.0
    self.unavail = {p.name: p.unavailable(platform) for p in providers}

  def elapsed(self) -> float:
    return time.perf_counter() - self.t_start

  def out_of_time(self) -> bool:
    return self.args.time_limit > 0 and self.elapsed() > self.args.time_limit

  def _log(self, msg: str) -> None:
    print(f"[{self.elapsed():6.0f}s] {msg}", flush=True)

  def run_problem(self, case: cases_mod.Case) -> None:
    """Measures every provider on one problem (shared by all cases with the same key)."""
    live = [p for p in self.providers if not self.unavail[p.name]]
    ours = next((p for p in live if p.name == prov_mod.OURS), None)
    case_skip = None
    if ours is not None:
      why = ours.unsupported(case)
      if why:
        case_skip = f"{report.CASE_SKIP_PREFIX}{why}"
    todo = []
    for p in self.providers:
      why = self.unavail[p.name]
      if why:
        status = ("unavailable", why)
      elif case_skip:
        status = ("skipped", case_skip)
      else:
        reason = p.unsupported(case)
        status = ("unsupported", reason) if reason else None
      for direction in case.directions:
        if status:
          self.results[(case.key, direction, p.name)] = {"status": status[0], "reason": status[1]}
        else:
          todo.append((direction, p))
    if case_skip:
      self._log(f"{_case_str(case)}: skipped ({case_skip})")
    if not todo:
      return

    inputs = None
    try:
      for direction in case.directions:
        for p in [p for d, p in todo if d == direction]:
          key = (case.key, direction, p.name)
          if self.out_of_time():
            self.results[key] = {"status": "skipped", "reason": f"time limit {self.args.time_limit:.0f}s"}
            continue
          if inputs is None:
            inputs = Inputs(case, seed=self.args.seed, device=self.device)
          self.results[key] = self._measure(p, case, inputs, direction)
    finally:
      del inputs
      self._release_memory()

  def _measure(self, p, case, inputs: Inputs, direction: str) -> dict:
    t0 = time.perf_counter()
    try:
      ref_t0 = time.perf_counter()
      inputs.reference(direction)
      self.reference_s += time.perf_counter() - ref_t0
      t0 = time.perf_counter()
      runner = p.build(case, inputs, direction)
      got = runner.check()
      first = time.perf_counter() - t0
      ok, errs = inputs.compare(got, direction)
      if not ok:
        res = {"status": "mismatch", "reason": _errs_str(errs), "check": errs, "first_call_s": first}
      else:
        t = timing.measure(runner.call, runner.sync, self.tcfg, runner.cuda_events)
        res = {"status": "ok", "reason": None, "check": errs, "first_call_s": first, "timing": t}
    except Exception as e:  # pylint: disable=broad-except
      msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
      res = {"status": "error", "reason": msg, "traceback": traceback.format_exc()[-3000:]}
      self._release_memory()
    wall = time.perf_counter() - t0
    res["wall_s"] = wall
    self.wall_by_provider[p.name] = self.wall_by_provider.get(p.name, 0.0) + wall
    self._log(f"{_case_str(case)} {direction:6s} {p.name:18s} {_result_str(res, case, direction)}")
    return res

  @staticmethod
  def _release_memory():
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
      torch.cuda.empty_cache()

  def rows(self, case_list) -> list[dict]:
    rows = []
    for case in case_list:
      for direction in case.directions:
        for p in self.providers:
          res = self.results.get((case.key, direction, p.name))
          if res is not None:
            rows.append(_row(case, direction, p, res))
    report.add_ratios(rows)
    return rows


def _case_str(case) -> str:
  mask = "causal" if case.causal else "full"
  return f"{case.set}/{case.label} {case.shape_str()} {report.DTYPE_SHORT.get(case.dtype, case.dtype)} {mask}"


def _errs_str(errs: dict) -> str:
  return " ".join(f"{n} {e['err']:.2e}>{e['tol']:.1e}" if not e["err"] <= e["tol"] else f"{n} ok"
                  for n, e in errs.items())


def _result_str(res: dict, case, direction: str) -> str:
  if res["status"] != "ok":
    return f"{res['status'].upper()}: {res['reason']}"
  t = res["timing"]
  return (f"{t.median_s * 1e3:9.3f} ms {case.flops(direction) / t.median_s / 1e12:7.1f} TFLOP/s "
          f"(first call {res['first_call_s']:.1f}s, {t.reps}x{t.inner})")


def _row(case, direction, p, res) -> dict:
  t = res.get("timing")
  flops = case.flops(direction)
  nbytes = case.min_bytes() if case.kind == "decode" else None
  return {
      "set": case.set, "label": case.label, "kind": case.kind, "shape": case.shape_str(),
      "b": case.b, "h": case.h, "hk": case.hk, "sq": case.sq, "sk": case.sk, "d": case.d,
      "dtype": case.dtype, "causal": case.causal, "window": list(case.window), "softcap": case.softcap,
      "alibi": case.alibi, "group": case.group,
      "key": str(case.key), "plain_key": None if case.plain().key == case.key else str(case.plain().key),
      "direction": direction, "provider": p.name, "framework": p.framework, "ours": p.ours,
      "status": res["status"], "reason": res.get("reason"),
      "flops": flops, "bytes": nbytes,
      "ms": t.median_s * 1e3 if t else None,
      "ms_min": t.min_s * 1e3 if t else None,
      "ms_q1": t.q1_s * 1e3 if t else None,
      "ms_q3": t.q3_s * 1e3 if t else None,
      "reps": t.reps if t else None, "inner": t.inner if t else None,
      "tflops": flops / t.median_s / 1e12 if t else None,
      "tbps": nbytes / t.median_s / 1e12 if t and nbytes else None,
      "first_call_s": res.get("first_call_s"), "wall_s": res.get("wall_s"),
      "check": res.get("check"), "traceback": res.get("traceback"),
  }


def run_overhead(smoke: bool, out_dir: str) -> dict:
  """Bridge per-call overhead from bench/bridge_overhead.py (maintained separately), when present.

  Calls its `main(argv)` with --smoke/--out (it prints its own report too) and flattens the returned
  report into rows: one table per part (host overhead, throughput).
  """
  try:
    mod = importlib.import_module("bench.bridge_overhead")
  except ModuleNotFoundError as e:
    absent = e.name == "bench.bridge_overhead"
    why = "bench/bridge_overhead.py not present" if absent else f"import failed: {e}"
    return {"status": "skipped", "reason": why, "rows": []}
  except Exception as e:  # pylint: disable=broad-except
    return {"status": "error", "reason": f"import failed: {type(e).__name__}: {e}"[:300], "rows": []}
  if not callable(getattr(mod, "main", None)):
    return {"status": "skipped", "reason": "bench.bridge_overhead has no main(argv)", "rows": []}
  argv = (["--smoke"] if smoke else []) + ["--out", os.path.join(out_dir, "bridge_overhead.json")]
  try:
    out = mod.main(argv)
  except SystemExit as e:
    return {"status": "error", "reason": f"bench.bridge_overhead exited with {e.code}", "rows": []}
  except Exception as e:  # pylint: disable=broad-except
    return {"status": "error", "reason": f"{type(e).__name__}: {e}"[:300], "rows": [],
            "traceback": traceback.format_exc()[-3000:]}
  rows = []
  if isinstance(out, dict):
    for part, val in out.items():
      items = [val] if isinstance(val, dict) else val if isinstance(val, list) else []
      flat = [_flatten(item) for item in items if isinstance(item, dict)]
      # Parts of text only (versions, device names) are metadata, kept in "report" but not tabled.
      rows += [{"part": part, **f} for f in flat if not all(isinstance(x, str) for x in f.values())]
  return {"status": "ok", "reason": None if rows else "ran; returned no rows", "rows": rows, "report": out}


def _flatten(d: dict, prefix: str = "") -> dict:
  flat = {}
  for k, v in d.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
  return flat


def versions() -> dict:
  v = {"python": sys.version.split()[0]}
  for dist in VERSION_DISTS:
    try:
      v[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  torch = sys.modules.get("torch")
  if torch is not None:
    v["torch.version.cuda"] = torch.version.cuda
    try:
      v["torch.cudnn"] = torch.backends.cudnn.version()
    except Exception:  # pylint: disable=broad-except
      pass
  return v


def device_info(platform: str) -> dict:
  devs = jax.devices()
  info = {"platform": platform, "jax_devices": [str(d) for d in devs], "device_kind": devs[0].device_kind,
          "host": _platform.node(), "cpu_count": os.cpu_count()}
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    info["torch_device"] = torch.cuda.get_device_name()
    info["torch_capability"] = list(torch.cuda.get_device_capability())
  if platform == "gpu":
    try:
      query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
      smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=20, check=False)
      info["nvidia_smi"] = smi.stdout.strip()
    except Exception:  # pylint: disable=broad-except
      pass
  return info


def git_info() -> dict:
  # Read-only queries; GIT_OPTIONAL_LOCKS=0 keeps `git status` from refreshing the index.
  env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
  def git(*a):
    r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=20, env=env,
                       check=False)
    return r.stdout.strip() if r.returncode == 0 else None
  try:
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}
  except Exception:  # pylint: disable=broad-except
    return {"commit": None, "dirty": None}


def main(argv=None) -> dict:
  args = parse_args(argv)
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  if not args.smoke:
    # Not in --smoke: it runs in-process from the tests, whose environment it must leave alone.
    _share_gpu_memory()
  if args.jax_cache and not args.smoke:
    jax.config.update("jax_compilation_cache_dir", args.jax_cache)
  if args.smoke:
    platform, device = "cpu", jax.devices("cpu")[0]
  else:
    platform = "gpu" if any(d.platform == "gpu" for d in jax.devices()) else "cpu"
    device = None
  if platform != "gpu" and not args.smoke and not args.allow_cpu:
    raise SystemExit("bench: jax sees no GPU; full-size sets in interpret mode would take hours. "
                     "Use --smoke (or --allow-cpu).")
  providers = _select_providers(args)
  os.makedirs(args.out, exist_ok=True)
  bench = Bench(args, providers, platform, device)
  case_list = [c for c in cases_mod.cases_for(args.sets) if _case_filter(args.only)(c)]

  print(f"bench: sets {' '.join(args.sets)}; {len(case_list)} cases on {platform} "
        f"({jax.devices()[0].device_kind}); jax {jax.__version__}", flush=True)
  for p in providers:
    if bench.unavail[p.name]:
      print(f"  provider {p.name}: unavailable ({bench.unavail[p.name]})", flush=True)

  record = {
      "schema": 1,
      "started": started,
      "argv": sys.argv if argv is None else ["bench.run", *argv],
      "config": {
          "sets": args.sets, "smoke": args.smoke, "providers": [p.name for p in providers],
          "only": args.only, "seed": args.seed, "time_limit_s": args.time_limit,
          "timing": dataclasses.asdict(bench.tcfg),
          "check": {"rows": CHECK_ROWS, "floor": FLOOR, "factor": FACTOR,
                    "rule": "err <= factor * err(input-dtype reference) + floor, vs float32 reference"},
          "flops": "4*b*H*d*kept_pairs forward (causal sq==sk: sq*sk/2; windows: exact band); x3.5 fwd+bwd",
          "env": {k: v for k, v in os.environ.items()
                  if k.startswith(("XLA_", "JAX_", "PALLAS_ATTN", "TORCH", "CUDA_VISIBLE", "TRITON"))},
      },
      "git": git_info(),
      "providers": {p.name: {"framework": p.framework, "ours": p.ours, "unavailable": bench.unavail[p.name]}
                    for p in providers},
  }
  json_path = os.path.join(args.out, "results.json")

  ctx = jax.default_device(device) if device is not None else _null()
  with ctx:
    done = set()
    for case in case_list:
      if case.key in done:
        continue
      done.add(case.key)
      bench.run_problem(case)
      record["rows"] = bench.rows(case_list)
      record["elapsed_s"] = bench.elapsed()
      report.write_json(json_path, record)
    overhead = run_overhead(args.smoke, args.out) if "overhead" in args.sets else None

  rows = bench.rows(case_list)
  record.update({
      "rows": rows,
      "overhead": overhead,
      "device": device_info(platform),
      "versions": versions(),
      "elapsed_s": bench.elapsed(),
      "reference_s": bench.reference_s,
      "wall_by_provider_s": bench.wall_by_provider,
  })
  order = [p.name for p in providers]
  pngs = []
  for s in args.sets:
    if s in cases_mod.CASE_SETS and any(r["set"] == s for r in rows):
      path = os.path.join(args.out, f"tflops_{s}.png")
      try:
        report.plot_set(path, s, rows, order)
        pngs.append(path)
      except Exception as e:  # pylint: disable=broad-except
        print(f"plot {s} failed: {type(e).__name__}: {e}", flush=True)
  record["plots"] = [os.path.basename(p) for p in pngs]
  report.write_json(json_path, record)

  walls = ", ".join(f"{n} {s:.0f}s" for n, s in sorted(bench.wall_by_provider.items(), key=lambda kv: -kv[1]))
  walls = walls or "nothing measured"
  text = []
  if overhead is not None:
    text += ["bridge overhead:", report.overhead_table(overhead), ""]
  if rows:
    text += [report.long_table(rows), "",
             "ours/x: our TFLOP/s over that row's (> 1: ours faster); x plain: TFLOP/s over the same "
             "provider's plain case at the same shape", "",
             report.summary_table(rows, order)]
  table = "\n".join(text)
  with open(os.path.join(args.out, "table.txt"), "w") as f:
    f.write(table + "\n")
  print(f"\nwall time by provider (compile included): {walls}; reference checks {bench.reference_s:.0f}s; "
        f"total {bench.elapsed():.0f}s", flush=True)
  print(f"wrote {json_path}, table.txt, {', '.join(os.path.basename(p) for p in pngs) or 'no plots'} "
        f"in {args.out}\n", flush=True)
  print(table, flush=True)
  return record


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


if __name__ == "__main__":
  main()
