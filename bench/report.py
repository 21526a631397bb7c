"""Results out: derived ratios, the printed tables, the JSON record and the TFLOP/s plots."""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

from bench.providers import OURS

CASE_COLS = ("set", "label", "shape", "dtype", "causal", "direction")
CASE_SKIP_PREFIX = "ours: "  # reason given to every provider's row when our kernels cannot run the case
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _case_id(row) -> tuple:
  return tuple(row[c] for c in CASE_COLS)


def _perf_id(row) -> tuple:
  """Identity of a measurement: the physical problem, direction and provider."""
  return (row["key"], row["direction"], row["provider"])


def add_ratios(rows: list[dict]) -> None:
  """ours_ratio: our TFLOP/s over this row's (> 1: ours is faster). x_plain: this row's TFLOP/s over the
  same provider's plain baseline at the same shape (variants only)."""
  ok = {_perf_id(r): r for r in rows if r["status"] == "ok"}
  for r in rows:
    r["ours_ratio"] = None
    r["x_plain"] = None
    if r["status"] != "ok":
      continue
    ours = ok.get((r["key"], r["direction"], OURS))
    if ours is not None and r["provider"] != OURS:
      r["ours_ratio"] = ours["tflops"] / r["tflops"]
    if r.get("plain_key") is not None:
      base = ok.get((r["plain_key"], r["direction"], r["provider"]))
      if base is not None:
        r["x_plain"] = r["tflops"] / base["tflops"]


def _fmt(x, spec: str) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _tf(x) -> str:
  """TFLOP/s with one decimal on the GPU and three significant digits for the tiny smoke numbers."""
  return _fmt(x, ".1f" if x is None or x >= 10 else ".3g")


def _render(header: list[str], body: list[list[str]], right: set[int]) -> str:
  widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
  def line(cells):
    padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "  ".join(padded).rstrip()
  rule = "-" * len(line(header))
  return "\n".join([line(header), rule] + [line(r) for r in body])


def _case_cells(row) -> list[str]:
  return [row["set"], row["label"], row["shape"], DTYPE_SHORT.get(row["dtype"], row["dtype"]),
          "causal" if row["causal"] else "-", row["direction"]]


def long_table(rows: list[dict]) -> str:
  """One line per attempted (case, direction, provider); unsupported pairs are left to the JSON."""
  body, last = [], None
  shown_rows, skipped_cases = [], set()
  for r in rows:
    if r["status"] in ("unsupported", "unavailable"):
      continue
    if r["reason"] and r["reason"].startswith(CASE_SKIP_PREFIX):
      # A problem our kernels cannot run yet is skipped for everyone: one line says so.
      if _case_id(r) in skipped_cases:
        continue
      skipped_cases.add(_case_id(r))
      r = dict(r, provider="(all)")
    shown_rows.append(r)
  decode = any(r["kind"] == "decode" for r in shown_rows)  # TB/s only means something for decode
  header = ["set", "case", "shape", "dtype", "mask", "dir", "provider", "ms", "TFLOP/s"]
  header += ["TB/s"] * decode + ["ours/x", "x plain", "status"]
  for r in shown_rows:
    cells = _case_cells(r)
    shown = [""] * len(cells) if _case_id(r) == last else cells
    last = _case_id(r)
    status = "ok" if r["status"] == "ok" else f"{r['status'].upper()}: {r['reason'] or ''}"[:90]
    tbps = [_fmt(r["tbps"], ".2f") if r["kind"] == "decode" else ""] * decode
    body.append(shown + [r["provider"], _fmt(r["ms"], ".3f"), _tf(r["tflops"])] + tbps +
                [_fmt(r["ours_ratio"], ".2f"), _fmt(r["x_plain"], ".2f"), status])
  return _render(header, body, right=set(range(7, len(header) - 1)))


def summary_table(rows: list[dict], provider_order: list[str]) -> str:
  """TFLOP/s per provider side by side, and ours against the fastest peer."""
  measured = [p for p in provider_order if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
  groups: OrderedDict = OrderedDict()
  for r in rows:
    groups.setdefault(_case_id(r), {})[r["provider"]] = r
  header = ["set", "case", "shape", "dtype", "mask", "dir"] + measured + ["best peer", "ours/best"]
  body = []
  for by_prov in groups.values():
    any_row = next(iter(by_prov.values()))
    cells = _case_cells(any_row)
    for p in measured:
      r = by_prov.get(p)
      if r is None or r["status"] in ("unsupported", "unavailable"):
        cells.append("")
      elif r["status"] == "ok":
        cells.append(_tf(r["tflops"]))
      else:
        cells.append(r["status"][:8])
    peers = [r for r in by_prov.values() if r["status"] == "ok" and not r["ours"]]
    ours = by_prov.get(OURS)
    best = max(peers, key=lambda r: r["tflops"]) if peers else None
    cells.append(best["provider"] if best else "-")
    ratio = ours["tflops"] / best["tflops"] if best and ours and ours["status"] == "ok" else None
    cells.append(_fmt(ratio, ".2f"))
    body.append(cells)
  return _render(header, body, right=set(range(6, len(header))) - {len(header) - 2})


def overhead_table(overhead: dict) -> str:
  rows = overhead.get("rows") or []
  if not rows:
    return f"overhead: {overhead.get('status')}: {overhead.get('reason') or 'no rows'}"
  parts = OrderedDict()
  for r in rows:
    parts.setdefault(r.get("part", ""), []).append(r)
  out = []
  for part_rows in parts.values():
    keys = list(OrderedDict.fromkeys(k for r in part_rows for k in r))
    body = [[_fmt(r.get(k), ".4g") if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
            for r in part_rows]
    out.append(_render(keys, body, right=set()))
  return "\n\n".join(out)


def write_json(path: str, record: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, default=_json_default, allow_nan=True)
  os.replace(tmp, path)


def _json_default(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, (set, frozenset, tuple)):
    return list(x)
  return str(x)


def plot_set(path: str, set_name: str, rows: list[dict], provider_order: list[str]) -> None:
  """TFLOP/s against sequence length per provider, one panel per (case, d, dtype, mask, direction).

  A set whose cases each have a single sequence length (variants, decode) is drawn as grouped bars
  per case instead.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  ok = [r for r in rows if r["set"] == set_name and r["status"] == "ok"]
  seqs = {}
  for r in ok:
    seqs.setdefault(r["label"], set()).add(r["sq"])
  as_lines = any(len(s) > 1 for s in seqs.values())
  if as_lines:
    pkey = lambda r: (r["label"], r["d"], r["dtype"], r["causal"], r["direction"])
    ptitle = lambda k: f"{k[0]} d{k[1]} {DTYPE_SHORT.get(k[2], k[2])} {'causal' if k[3] else 'full'} {k[4]}"
  else:
    pkey = lambda r: (r["d"], r["dtype"], r["causal"], r["direction"])
    ptitle = lambda k: f"d{k[0]} {DTYPE_SHORT.get(k[1], k[1])} {'causal' if k[2] else 'full'} {k[3]}"
  panels: OrderedDict = OrderedDict()
  for r in ok:
    panels.setdefault(pkey(r), []).append(r)

  n = max(1, len(panels))
  ncols = min(4, n)
  nrows = -(-n // ncols)
  fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.6), dpi=110)
  FigureCanvasAgg(fig)
  fig.suptitle(f"pallas-attn bench: {set_name} (TFLOP/s, higher is better)")
  if not panels:
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, "no successful measurements", ha="center", va="center")
    ax.set_axis_off()
  provs = [p for p in provider_order if any(r["provider"] == p for r in ok)]
  colors = {p: f"C{i % 10}" for i, p in enumerate(provs)}
  for idx, (k, prs) in enumerate(panels.items()):
    ax = fig.add_subplot(nrows, ncols, idx + 1)
    ax.set_title(ptitle(k), fontsize=9)
    ax.grid(True, alpha=0.3)
    if as_lines:
      for p in provs:
        pts = sorted((r["sq"], r["tflops"]) for r in prs if r["provider"] == p)
        if pts:
          ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p, color=colors[p],
                  linestyle="-" if p.startswith(OURS) else "--")
      ax.set_xscale("log", base=2)
      xs = sorted({r["sq"] for r in prs})
      ax.set_xticks(xs)
      ax.set_xticklabels([str(x) for x in xs], fontsize=8)
      ax.minorticks_off()
      ax.set_xlabel("sequence length")
    else:
      labels = list(OrderedDict.fromkeys(r["label"] for r in prs))
      width = 0.8 / max(1, len(provs))
      for j, p in enumerate(provs):
        xs, ys = [], []
        for i, lab in enumerate(labels):
          hit = [r for r in prs if r["provider"] == p and r["label"] == lab]
          if hit:
            xs.append(i + (j - (len(provs) - 1) / 2) * width)
            ys.append(hit[0]["tflops"])
        if xs:
          ax.bar(xs, ys, width=width, label=p, color=colors[p])
      ax.set_xticks(range(len(labels)))
      ax.set_xticklabels(labels, rotation=30, fontsize=8)
    ax.set_ylabel("TFLOP/s")
    ax.set_ylim(bottom=0)
  if provs:
    handles, labels = [], []
    for ax in fig.axes:
      for h, lab in zip(*ax.get_legend_handles_labels()):
        if lab not in labels:
          handles.append(h)
          labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
  fig.tight_layout(rect=(0, 0.06 + 0.04 * (len(provs) > 5), 1, 0.96))
  fig.savefig(path)
