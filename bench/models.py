"""Real models: transformers models built from configs, trained and decoded with the reference
attention and with ours, tokens/s side by side in one process.

    python -m bench.models [--smoke] [--models llama mistral gemma2] [--out FILE]

Each model (no download: built from a config, random weights, bf16 on CUDA, fp32 on the CPU):
- train: one step (forward, backward, AdamW) on a (batch, seq) batch of random tokens, median of
  `--steps` timed steps after warm-up;
- decode: greedy generate() of `--new-tokens` tokens with transformers' default dynamic cache,
  once per prompt length in `--prompts` (varied lengths, so the cache length differs every call),
  tokens/s over the whole generate() call; and JAX compiles counted while it runs: all of them,
  and those after its first `--settle` generated tokens (the steady state, which should be 0).
The reference attention is SDPA, or eager where SDPA lacks the model's option (Gemma2's softcap);
ours comes in through transformers' attention interface (torch_bridge.integrations.transformers).

Shapes (GPU): a 155M-parameter Llama (hidden 1024, 8 layers, 16 query / 4 kv heads, head_dim 64),
a Mistral of the same size with a 1024-token sliding window, a Gemma2 of the same size (logit
softcap 50), batch 4, seq 2048, 64 new tokens. --smoke: tiny models on the CPU (interpret mode).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_bridge  # noqa: E402  first: JAX's GPU memory policy

import jax  # pylint: disable=g-import-not-at-top,wrong-import-order

SIZES = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=8192)
SMOKE_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256)
REFERENCE = {"llama": "sdpa", "mistral": "sdpa", "gemma2": "eager"}  # SDPA has no softcap


def config(name: str, smoke: bool):
  import transformers  # pylint: disable=g-import-not-at-top
  sizes = SMOKE_SIZES if smoke else SIZES
  if name == "llama":
    return transformers.LlamaConfig(**sizes)
  if name == "mistral":
    return transformers.MistralConfig(**sizes, sliding_window=8 if smoke else 1024)
  if name == "gemma2":
    return transformers.Gemma2Config(**sizes, sliding_window=8 if smoke else 4096,
                                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                     query_pre_attn_scalar=sizes["head_dim"])
  raise ValueError(f"models: expected llama, mistral or gemma2, got {name!r}")


class Compiles:
  """JAX backend compiles, counted from jax.monitoring's compile events."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **_):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def _sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def build(name, impl, smoke, device, dtype, seed=0):
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  cfg = config(name, smoke)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=dtype)
  return model.to(device)


def train(model, batch, seq, steps, device):
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
  g = torch.Generator().manual_seed(1)
  ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
  times, loss = [], None
  for i in range(steps + 2):  # two warm-up steps: compiles, allocator, optimizer state
    _sync(device)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    if i >= 2:
      times.append(time.perf_counter() - t0)
  step = statistics.median(times)
  return {"step_s": step, "tokens_per_s": batch * seq / step, "loss": float(loss.detach())}


def decode(model, batch, prompts, new_tokens, settle, device, compiles):
  import transformers  # pylint: disable=g-import-not-at-top
  model.eval()
  marks = {}

  class Mark(transformers.LogitsProcessor):
    """Notes the compile count when the `settle`-th new token is chosen."""

    def __init__(self, start):
      self.start = start

    def __call__(self, input_ids, scores):
      if input_ids.shape[1] - self.start == settle:
        marks["settled"] = compiles.count
      return scores

  rows = []
  g = torch.Generator().manual_seed(2)
  for length in prompts:
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=g).to(device)
    marks.clear()
    c0 = compiles.count
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           logits_processor=transformers.LogitsProcessorList([Mark(length)]))
    _sync(device)
    dt = time.perf_counter() - t0
    rows.append({"prompt": length, "s": dt, "tokens_per_s": batch * new_tokens / dt,
                 "compiles": compiles.count - c0,
                 "compiles_after_settle": compiles.count - marks.get("settled", c0),
                 "tokens": out[:, length:].tolist()})
  return rows


def run(names, smoke, device, steps, batch, seq, prompts, new_tokens, settle):
  from torch_bridge.integrations import transformers as hf  # pylint: disable=g-import-not-at-top
  hf.register()
  dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
  compiles = Compiles()
  report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "versions": {"torch": torch.__version__, "jax": jax.__version__,
                         "transformers": __import__("transformers").__version__},
            "shapes": {"batch": batch, "seq": seq, "prompts": list(prompts), "new_tokens": new_tokens},
            "models": {}}
  for name in names:
    row = {}
    for impl in (REFERENCE[name], "pallas_attn"):
      model = build(name, impl, smoke, device, dtype)
      row[impl] = {"train": train(model, batch, seq, steps, device),
                   # decode twice: the second pass over the same prompt lengths is the steady state
                   "decode": decode(model, batch, prompts, new_tokens, settle, device, compiles)}
      # a second pass for both: warm (ours: no compiles left), so the ratio compares like with like
      row[impl]["decode_again"] = decode(model, batch, prompts, new_tokens, settle, device, compiles)
      del model
      if device.type == "cuda":
        torch.cuda.empty_cache()
    ref, ours = row[REFERENCE[name]], row["pallas_attn"]
    row["train_ratio"] = ours["train"]["tokens_per_s"] / ref["train"]["tokens_per_s"]
    row["decode_ratio"] = (statistics.mean(r["tokens_per_s"] for r in ours["decode_again"])
                           / statistics.mean(r["tokens_per_s"] for r in ref["decode_again"]))
    row["same_tokens"] = [a["tokens"] == b["tokens"] for a, b in zip(ref["decode"], ours["decode"])]
    report["models"][name] = row
    print(f"{name}: train {ref['train']['tokens_per_s']:.0f} tok/s ({REFERENCE[name]}) vs "
          f"{ours['train']['tokens_per_s']:.0f} (ours) = {row['train_ratio']:.2f}x; decode "
          f"{row['decode_ratio']:.2f}x; compiles per generate {[r['compiles'] for r in ours['decode']]}"
          f", again {[r['compiles'] for r in ours['decode_again']]}, after settling "
          f"{[r['compiles_after_settle'] for r in ours['decode']]}; same greedy tokens "
          f"{row['same_tokens']}", flush=True)
  return report


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
  p.add_argument("--models", nargs="+", default=["llama", "mistral", "gemma2"])
  p.add_argument("--device", default=None)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--prompts", type=int, nargs="+", default=None)
  p.add_argument("--new-tokens", type=int, default=None)
  p.add_argument("--settle", type=int, default=4, help="new tokens before the steady state")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "models.json"))
  a = p.parse_args(argv)
  device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.smoke else "cpu"))
  if a.smoke:
    batch, seq, steps, prompts, new = 2, 16, a.steps or 1, a.prompts or [5, 9], a.new_tokens or 6
  else:
    batch, seq, steps, prompts, new = 4, 2048, a.steps or 5, a.prompts or [128, 333, 517], a.new_tokens or 64
  report = run(a.models, a.smoke, device, steps, batch, seq, prompts, new, min(a.settle, new - 1))
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
