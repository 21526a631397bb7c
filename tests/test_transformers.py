"""transformers on our kernels, both routes: `attn_implementation="pallas_attn"` (our
AttentionInterface registration) and transformers' own `"flash_attention_2"` after compat.install().

Tiny models built from configs (no download): Llama (GQA), Mistral (sliding window), Gemma2 (softcap,
sliding window, query_pre_attn_scalar), on a left-padded batch. Each route is checked against the
same model run in float64 with plain attention (the accurate reference; see _reference_attention) by the project's rule, with
transformers' own SDPA / eager in the input dtype as the low-precision reference: logits (valid
positions), loss, the gradient of every parameter, and greedy generation with a KV cache.
On CUDA the same tests run in bf16 (the flash_attention_2 route needs CUDA in transformers; on the
CPU the test lifts only that device gate).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_bridge.compat

transformers = pytest.importorskip("transformers")

import numerics  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from torch_bridge.integrations import transformers as tb_transformers  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BATCH, SEQ, NEW_TOKENS, VOCAB = 2, 12, 3, 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
               initializer_range=0.3, attention_dropout=0.0)
# name -> (config class, model class, extra config, low-precision implementation). The windows (6)
# are shorter than the batch (12), so they mask something.
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}, "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 6, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0}, "eager"),
}

# gpt-oss (attention sinks: one learned logit per head, `s_aux`) with a mixture of experts; its
# grouped-matmul experts have no float64 kernel, the eager ones do.
SINK_MODELS = {
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"sliding_window": 6, "num_local_experts": 4, "num_experts_per_tok": 2,
                 "layer_types": ["sliding_attention", "full_attention"]}, "eager"),
}
MODELS.update(SINK_MODELS)
MODEL_KWARGS = {"gpt_oss": {"experts_implementation": "eager"}}

REFERENCE = "reference_float64"


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         softcap=None, s_aux=None, **_):
  """Attention in the inputs' dtype (float64 here) with an exact mask. transformers' eager is not
  usable in float64: its softmax runs in float32, where its additive mask (float64's min, twice for
  padding plus window) becomes -inf, so fully masked padding rows turn NaN and spread."""
  del dropout  # the reference runs without dropout
  groups = query.shape[1] // key.shape[1]
  key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
  scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
  if softcap is not None:
    scores = softcap * torch.tanh(scores / softcap)
  if attention_mask is not None:  # eager_mask: 0 where visible, the dtype's min where masked
    scores = scores.masked_fill(attention_mask[..., :key.shape[2]] != 0, float("-inf"))
  if s_aux is not None:  # one sink logit per head: an extra column, dropped after the softmax
    sink = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1).to(scores.dtype)
    scores = torch.cat([scores, sink], dim=-1)
  probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :key.shape[2]]  # empty rows give 0
  return (probs @ value).transpose(1, 2).contiguous(), None


def _register_reference():
  from transformers.masking_utils import AttentionMaskInterface, eager_mask  # pylint: disable=g-import-not-at-top
  transformers.AttentionInterface.register(REFERENCE, _reference_attention)
  AttentionMaskInterface.register(REFERENCE, eager_mask)


_register_reference()


def _model(name, implementation, dtype, **overrides):
  config_cls, model_cls, extra, _ = MODELS[name]
  config = getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})  # one per model
  torch.manual_seed(0)  # same weights in every model of a test
  model = getattr(transformers, model_cls)._from_config(config, attn_implementation=implementation,
                                                        **MODEL_KWARGS.get(name, {}))
  return model.to(device=DEVICE, dtype=dtype)


def _batch():
  gen = torch.Generator().manual_seed(1)
  ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
  mask = torch.ones(BATCH, SEQ, dtype=torch.long)
  mask[1, :5] = 0  # left padding, as for generation
  labels = ids.masked_fill(mask == 0, -100)
  return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def _run(model, ids, mask, labels):
  """(logits at valid positions, loss, {parameter: gradient}) as float32/64 numpy on the host."""
  model.zero_grad()
  out = model(input_ids=ids, attention_mask=mask, labels=labels)
  out.loss.backward()
  host = lambda t: t.detach().float().cpu().numpy() if t.dtype != torch.float64 else t.detach().cpu().numpy()
  grads = {n: host(p.grad) for n, p in model.named_parameters() if p.grad is not None}
  return host(out.logits[mask.bool()]), host(out.loss), grads


def _check_key_bias_grad(param, ours, ref):
  """A key bias shifts every score of a row alike, which softmax ignores: its gradient is the sum
  over a row's keys of dS = P (dP - D), zero but for the sink's share (D * P_sink). A flash backward
  takes D = rowsum(dO * O) from the stored bf16 output, off by an O(eps) amount that is the same
  for every key of the row, so the sum gathers it coherently while the true value cancels (eager
  computes D from the P it differentiates; FA2/FA3 compute it as we do). So in bf16 this one
  gradient is checked against the scale of its summands, the key projection's weight gradient,
  not by the rule; in float32 (CPU) the rule checks it like every other."""
  scale = np.abs(ref[param.replace("bias", "weight")]).max()
  err = np.abs(ours[param] - ref[param]).max()
  assert np.isfinite(ours[param]).all() and err <= 8 * numerics.eps("bfloat16") * scale * SEQ, (
      f"grad {param}: err {err:.3e} > 8 eps * {SEQ} * max|grad k_proj.weight| = "
      f"{8 * numerics.eps('bfloat16') * scale * SEQ:.3e}")


def _check_route(name, implementation):
  ids, mask, labels = _batch()
  lowp_impl = MODELS[name][3]
  models = {"ours": _model(name, implementation, DTYPE), "lowp": _model(name, lowp_impl, DTYPE),
            "ref": _model(name, REFERENCE, torch.float64)}
  assert models["ours"].config._attn_implementation == implementation  # pylint: disable=protected-access
  results = {k: _run(m, ids, mask, labels) for k, m in models.items()}
  (lo, ll, lg), (wo, wl, wg), (ro, rl, rg) = results["ours"], results["lowp"], results["ref"]
  numerics.assert_rule("logits", lo, wo, ro, factor=numerics.OUT_FACTOR, dtype=str(DTYPE).split(".")[1])
  numerics.assert_rule("loss", ll, wl, rl, factor=numerics.OUT_FACTOR, dtype=str(DTYPE).split(".")[1])
  assert set(lg) == set(rg), f"gradients: parameters {sorted(set(rg) ^ set(lg))} differ"
  for param in rg:
    if param.endswith("k_proj.bias") and name in SINK_MODELS and DTYPE != torch.float32:
      _check_key_bias_grad(param, lg, rg)
      continue
    numerics.assert_rule(f"grad {param}", lg[param], wg[param], rg[param], factor=numerics.GRAD_FACTOR,
                         dtype=str(DTYPE).split(".")[1])
  with torch.no_grad():
    tokens = {k: m.eval().generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0)[:, SEQ:].cpu()
              for k, m in models.items()}
  # In bf16 a near tie may flip a token; it must then flip as transformers' own low-precision run does.
  assert torch.equal(tokens["ours"], tokens["ref"]) or torch.equal(tokens["ours"], tokens["lowp"]), (
      f"generate: ours {tokens['ours'].tolist()}, float64 reference {tokens['ref'].tolist()}, "
      f"{lowp_impl} {tokens['lowp'].tolist()}")


@pytest.fixture(scope="module")
def pallas_attn_registered():
  return tb_transformers.register()


@pytest.mark.parametrize("name", sorted(MODELS))  # every model, sinks included
def test_pallas_attn_route(name, pallas_attn_registered):
  _check_route(name, pallas_attn_registered)


@pytest.fixture
def compat_installed(monkeypatch):
  """compat.install() for one test, undone after it (other test files see the plain import paths).

  transformers reads the installed distributions once, when it is imported, which in a whole test
  run happens before this fixture (users call install() first); the mapping is read again here as
  that import would have read it after install()."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  from transformers.utils import import_utils  # pylint: disable=g-import-not-at-top
  torch_bridge.compat.install()
  monkeypatch.setattr(import_utils, "PACKAGE_DISTRIBUTION_MAPPING",
                      importlib.metadata.packages_distributions())
  yield
  torch_bridge.compat.uninstall()


@pytest.fixture
def flash_attention_2_route(monkeypatch, compat_installed):
  """transformers' flash_attention_2 as shipped; on the CPU minus its CUDA gate (transformers checks
  for a CUDA device before it even looks at the package)."""
  del compat_installed
  from transformers.utils import import_utils  # pylint: disable=g-import-not-at-top
  assert "flash-attn" in import_utils.PACKAGE_DISTRIBUTION_MAPPING.get("flash_attn", []), (
      "compat.install() did not make flash-attn visible to importlib.metadata")
  if DEVICE == "cpu":
    monkeypatch.setattr(import_utils, "is_torch_cuda_available", lambda: True)
  import_utils.is_flash_attn_2_available.cache_clear()
  yield "flash_attention_2"
  import_utils.is_flash_attn_2_available.cache_clear()


# transformers' flash_attention_2 passes sinks only to functions with an `s_aux` argument, which
# flash-attn 2's have not: gpt-oss is a pallas_attn-route model.
@pytest.mark.parametrize("name", sorted(set(MODELS) - set(SINK_MODELS)))
def test_flash_attention_2_route(name, flash_attention_2_route):
  import transformers.modeling_flash_attention_utils as fa_utils  # pylint: disable=g-import-not-at-top
  _check_route(name, flash_attention_2_route)
  from torch_bridge import bert_padding, flash_attn_varlen_func  # pylint: disable=g-import-not-at-top
  assert fa_utils._flash_varlen_fn is flash_attn_varlen_func  # pylint: disable=protected-access
  assert fa_utils._pad_fn is bert_padding.pad_input  # pylint: disable=protected-access


def test_pallas_attn_dropout_in_training(pallas_attn_registered):
  """Training mode passes the config's attention dropout to our kernels: it changes the loss, and
  torch.manual_seed replays it exactly (the seed comes from torch's generator), backward included."""
  ids, mask, labels = _batch()
  model = _model("llama", pallas_attn_registered, DTYPE, attention_dropout=0.5)
  losses = []
  for train in (True, True, False):
    model.train(train)
    torch.manual_seed(7)
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    losses.append((float(loss), next(model.parameters()).grad.clone()))
  assert losses[0][0] == losses[1][0] and torch.equal(losses[0][1], losses[1][1])
  assert losses[0][0] != losses[2][0], "attention dropout had no effect in training mode"


def test_register_refuses_flash_names():
  with pytest.raises(ValueError, match="name: .*'flash'"):
    tb_transformers.register("my_flash_attn")


def test_distribution_visible(compat_installed):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  assert importlib.metadata.version("flash-attn") == "2.8.0"
  assert "flash-attn" in importlib.metadata.packages_distributions()["flash_attn"]
