"""bench.run --smoke end to end on the CPU: every output appears and every smoke row is measured."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import run  # noqa: E402  pylint: disable=wrong-import-position


def test_smoke_writes_table_json_and_plot(tmp_path, capsys):
  record = run.main(["--smoke", "--out", str(tmp_path)])
  printed = capsys.readouterr().out

  data = json.loads((tmp_path / "results.json").read_text())
  png = tmp_path / "tflops_smoke.png"
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "table.txt").read_text().strip()
  assert data["config"]["smoke"] and data["versions"]["jax"] and "device_kind" in data["device"]

  rows = data["rows"]
  assert len(rows) == len(record["rows"]) > 0
  bad = [(r["label"], r["shape"], r["direction"], r["provider"], r["status"], r["reason"]) for r in rows
         if r["status"] != "ok"]
  assert not bad, bad
  assert {(r["provider"], r["direction"]) for r in rows} == {
      (p, d) for p in ("pallas-attn", "xla-reference") for d in ("fwd", "fwdbwd")}
  assert all(r["tflops"] > 0 and r["ms"] > 0 for r in rows)
  assert all(r["ours_ratio"] > 0 for r in rows if r["provider"] != "pallas-attn")
  assert all(r["x_plain"] > 0 for r in rows if r["label"] != "plain")

  # The table is printed last, one line per measured row.
  table = printed[printed.rindex("set "):]
  tail = printed.strip().splitlines()[-1]
  assert "pallas-attn" in printed and "xla-reference" in table and "best peer" in table
  assert tail.startswith("smoke")
  assert sum(line.rstrip().endswith(" ok") for line in printed.splitlines()) == len(rows)


def test_models_smoke_trains_and_decodes_both_ways(tmp_path):
  # bench.models --smoke: tiny transformers models, reference attention against ours, on the CPU.
  import pytest  # pylint: disable=import-outside-toplevel
  pytest.importorskip("transformers")
  from bench import models  # pylint: disable=import-outside-toplevel
  out = tmp_path / "models.json"
  report = models.main(["--smoke", "--out", str(out)])
  assert json.loads(out.read_text())["models"].keys() == {"llama", "mistral", "gemma2"}
  for name, row in report["models"].items():
    ours = row["pallas_attn"]
    assert row["train_ratio"] > 0 and row["decode_ratio"] > 0, name
    assert all(row["same_tokens"]), f"{name}: greedy tokens differ from the reference attention"
    ref_loss = row[models.REFERENCE[name]]["train"]["loss"]
    assert abs(ours["train"]["loss"] - ref_loss) < 1e-3 * max(1.0, abs(ref_loss)), name
    assert all(r["compiles"] == 0 for r in ours["decode_again"]), f"{name}: decode recompiled"


def test_ring_smoke_writes_json(tmp_path):
  # bench.ring --smoke: the one-device comparison and (with conftest's 4 CPU devices) the scaling
  # part on 1 and 2 devices, in interpret mode.
  from bench import ring  # pylint: disable=import-outside-toplevel
  out = tmp_path / "ring.json"
  report = ring.main(["--smoke", "--out", str(out)])
  data = json.loads(out.read_text())
  assert data["one_gpu"] and all(r["plain_ms"] > 0 and r["ring_n1_ms"] > 0 for r in data["one_gpu"])
  assert all(r["max_abs_diff"] < 1e-4 for r in data["one_gpu"]), data["one_gpu"]
  assert {(r["causal"], r["layout"], r["direction"]) for r in data["one_gpu"]} == {
      (c, l, d) for c, l in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag"))
      for d in ("fwd", "fwdbwd")}
  if len(report["scaling"]):
    assert {r["devices"] for r in data["scaling"]} == {1, 2}
    assert all(r["tflops"] > 0 and r["efficiency"] > 0 for r in data["scaling"])
