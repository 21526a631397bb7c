"""Median-of-many timing for jax (host clock around block_until_ready) and torch (CUDA events).

Each sample times `inner` back-to-back calls, so kernels shorter than the host's launch-and-sync latency
are not dominated by it; `inner` and the sample count adapt to the call's length so each measurement
costs about `budget_s` after warm-up.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class TimingConfig:
  warmup: int = 2
  min_reps: int = 10
  max_reps: int = 50
  budget_s: float = 0.2
  # A host-timed sample pays one launch-and-sync round trip (50 to 100 us on the H100): over 20 ms of
  # calls that is under 0.5%; over the 2 ms used before, our 1.24 ms forward read 1.29 ms (4% slow).
  min_batch_s: float = 20e-3


SMOKE_TIMING = TimingConfig(warmup=1, min_reps=3, max_reps=5, budget_s=0.02, min_batch_s=1e-3)


@dataclasses.dataclass(frozen=True)
class Timing:
  median_s: float
  min_s: float
  q1_s: float
  q3_s: float
  reps: int
  inner: int


def measure(call: Callable[[], Any], sync: Callable[[Any], None], cfg: TimingConfig,
            cuda_events: bool = False) -> Timing:
  for _ in range(cfg.warmup):
    sync(call())
  t0 = time.perf_counter()
  sync(call())
  est = max(time.perf_counter() - t0, 1e-7)
  inner = max(1, min(100, math.ceil(cfg.min_batch_s / est)))
  reps = int(min(cfg.max_reps, max(cfg.min_reps, round(cfg.budget_s / (inner * est)))))
  samples = _torch_samples(call, inner, reps) if cuda_events else _host_samples(call, sync, inner, reps)
  samples.sort()
  q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
  return Timing(median_s=statistics.median(samples), min_s=samples[0], q1_s=q[0], q3_s=q[2], reps=reps,
                inner=inner)


def _host_samples(call, sync, inner: int, reps: int) -> list[float]:
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = call()
    sync(out)
    samples.append((time.perf_counter() - t0) / inner)
  return samples


def _torch_samples(call, inner: int, reps: int) -> list[float]:
  import torch  # pylint: disable=import-outside-toplevel
  starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
  ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
  for start, end in zip(starts, ends):
    start.record()
    for _ in range(inner):
      call()
    end.record()
  torch.cuda.synchronize()
  return [s.elapsed_time(e) / 1e3 / inner for s, e in zip(starts, ends)]


def jax_median_ms(fn, *args, cfg: TimingConfig = TimingConfig()) -> float:
  """Median milliseconds of a jitted JAX call (compiled and warmed up first)."""
  import jax  # pylint: disable=import-outside-toplevel
  return measure(lambda: fn(*args), jax.block_until_ready, cfg).median_s * 1e3


def torch_median_ms(call, cfg: TimingConfig = TimingConfig()) -> float:
  """Median milliseconds of a CUDA torch call, timed with events."""
  import torch  # pylint: disable=import-outside-toplevel
  return measure(call, lambda _: torch.cuda.synchronize(), cfg, cuda_events=True).median_s * 1e3
