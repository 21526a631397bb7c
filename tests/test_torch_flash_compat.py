"""flash-attn's helper modules on the torch face: flash_attn.bert_padding and flash_attn.layers.rotary
against plain-torch references, the private _flash_attn_* entry points against the public functions,
window_size given as a tensor. Tiny shapes: these run in Pallas interpret mode on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_bridge
import numerics
from torch_bridge import bert_padding, flash_attn_private as private, rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, S, H, HK, D = 2, 9, 4, 2, 16


def _mask():
  mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
  mask[0, :3] = False  # left padding
  mask[1, 7:] = False  # right padding
  return mask


def test_unpad_pad_roundtrip_and_gradient():
  x = torch.randn(B, S, H, D, device=DEVICE, dtype=torch.float64, requires_grad=True)
  mask = _mask()
  unused = torch.zeros_like(mask)
  unused[1, 7] = True
  xu, indices, cu, max_len, used = bert_padding.unpad_input(x, mask, unused)
  keep = mask | unused
  torch.testing.assert_close(xu, x[keep], rtol=0, atol=0)
  assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 14] and max_len == 8 and isinstance(max_len, int)
  assert used.tolist() == [6, 7] and indices.tolist() == torch.nonzero(keep.flatten()).flatten().tolist()
  back = bert_padding.pad_input(xu, indices, B, S)
  torch.testing.assert_close(back, x * keep[..., None, None], rtol=0, atol=0)
  back.sum().backward()
  torch.testing.assert_close(x.grad, keep[..., None, None].expand_as(x).double(), rtol=0, atol=0)
  assert bert_padding.index_first_axis(x.reshape(B * S, H, D), indices).shape == xu.shape
  with pytest.raises(ValueError, match="attention_mask: expected a tensor of shape"):
    bert_padding.unpad_input(x, mask[:, :4])


def test_unpad_concatenated_sequences():
  x = torch.arange(3 * 6, dtype=torch.float32, device=DEVICE).reshape(3, 6, 1)
  lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]], device=DEVICE)
  xu, indices, cu, max_len = bert_padding.unpad_input_for_concatenated_sequences(x, lengths)
  assert cu.tolist() == [0, 2, 5, 8, 10, 16] and max_len == 6
  assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10] + list(range(12, 18))
  torch.testing.assert_close(xu[:, 0], x.flatten()[indices], rtol=0, atol=0)


def _rotary_reference(x, cos, sin, interleaved, positions):
  """Plain torch, float64: rotate the first 2 * cos.shape[1] features of x (..., seqlen, h, d) at
  positions (..., seqlen)."""
  half = cos.shape[1]
  c, s = cos.double()[positions][..., None, :], sin.double()[positions][..., None, :]
  x = x.double()
  rot, rest = x[..., :2 * half], x[..., 2 * half:]
  if interleaved:
    a, b = rot[..., 0::2], rot[..., 1::2]
    rot = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
  else:
    a, b = rot[..., :half], rot[..., half:]
    rot = torch.cat([a * c - b * s, a * s + b * c], dim=-1)
  return torch.cat([rot, rest], dim=-1)


def _tables(n, half):
  angles = torch.rand(n, half, device=DEVICE, dtype=torch.float64) * 6.0
  return torch.cos(angles).float(), torch.sin(angles).float()


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_dense_and_grad(interleaved):
  cos, sin = _tables(16, 6)  # rotary_dim 12 < headdim 16: the rest passes through
  x = torch.randn(B, S, H, D, device=DEVICE, requires_grad=True)
  offsets = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
  out = rotary.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
  pos = offsets[:, None].long() + torch.arange(S, device=DEVICE)[None]
  ref = _rotary_reference(x.detach(), cos, sin, interleaved, pos)
  lowp = _rotary_reference(x.detach(), cos, sin, interleaved, pos).float()
  numerics.assert_output("rotary out", out.detach().cpu().numpy(), lowp.cpu().numpy(), ref.cpu().numpy())
  dout = torch.randn_like(out)
  out.backward(dout)
  # The rotation is orthogonal: its vector-Jacobian product is the inverse rotation (angle -> -angle).
  ref_dx = _rotary_reference(dout, cos, -sin, interleaved, pos)
  numerics.assert_grad("rotary dx", x.grad.cpu().numpy(), ref_dx.float().cpu().numpy(), ref_dx.cpu().numpy())


def test_apply_rotary_emb_varlen_and_inplace():
  cos, sin = _tables(12, 8)
  cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
  x = torch.randn(9, H, D, device=DEVICE)
  pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4], device=DEVICE) + 2  # seqlen_offsets=2
  ref = _rotary_reference(x, cos, sin, False, pos)
  out = rotary.apply_rotary_emb(x.clone(), cos, sin, seqlen_offsets=2, cu_seqlens=cu, max_seqlen=5)
  numerics.assert_output("varlen rotary", out.cpu().numpy(), ref.float().cpu().numpy(), ref.cpu().numpy())
  y = x.clone()
  assert rotary.apply_rotary_emb(y, cos, sin, inplace=True, seqlen_offsets=2, cu_seqlens=cu) is y
  torch.testing.assert_close(y, out, rtol=0, atol=0)


def test_rotary_qkv_kv_and_module_match_kvcache_rotary():
  """The module's in-place qkv form rotates q and k like apply_rotary_emb, leaves v, and agrees with
  the KV-cache path's rotary (both are one code path)."""
  emb = rotary.RotaryEmbedding(D, base=10000.0)
  qkv = torch.randn(B, S, 3, H, D, device=DEVICE)
  expect = qkv.clone()
  out = emb(qkv, seqlen_offset=3)
  assert out is qkv
  cos, sin = emb._cos_cached, emb._sin_cached  # pylint: disable=protected-access
  for i in (0, 1):
    torch.testing.assert_close(qkv[:, :, i], rotary.apply_rotary_emb(expect[:, :, i], cos, sin, seqlen_offsets=3))
  torch.testing.assert_close(qkv[:, :, 2], expect[:, :, 2], rtol=0, atol=0)
  ref = _rotary_reference(expect[:, :, 0], cos, sin, False, torch.arange(S, device=DEVICE)[None] + 3)
  numerics.assert_output("module q", qkv[:, :, 0].cpu().numpy(), ref.float().cpu().numpy(), ref.cpu().numpy())
  kv = expect[:, :, 1:].clone()
  rotary.apply_rotary_emb_kv_(kv, cos, sin, seqlen_offsets=3)
  torch.testing.assert_close(kv[:, :, 0], qkv[:, :, 1])
  torch.testing.assert_close(kv[:, :, 1], expect[:, :, 2], rtol=0, atol=0)


def test_private_forward_backward_match_public():
  q = torch.randn(B, S, H, D, device=DEVICE)
  k, v = torch.randn(B, S + 2, HK, D, device=DEVICE), torch.randn(B, S + 2, HK, D, device=DEVICE)
  out, lse, s_dmask, rng = private._flash_attn_forward(q, k, v, 0.0, None, True, 4, 0, 0.0, None, False)  # pylint: disable=protected-access
  assert rng.dtype == torch.int64 and rng.shape == (2,) and s_dmask.numel() == 0
  qp, kp, vp = (t.clone().requires_grad_() for t in (q, k, v))
  pub_out, pub_lse, _ = torch_bridge.flash_attn_func(qp, kp, vp, causal=True, window_size=torch.tensor([4, 0]),
                                                     return_attn_probs=True)
  torch.testing.assert_close(out, pub_out.detach(), rtol=0, atol=0)
  torch.testing.assert_close(lse, pub_lse.detach(), rtol=0, atol=0)
  dout = torch.randn_like(out)
  pub_out.backward(dout)
  dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
  softmax_d = private._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, None, True, 4, 0, 0.0,  # pylint: disable=protected-access
                                           None, False, rng)
  for name, ours, theirs in (("dq", dq, qp.grad), ("dk", dk, kp.grad), ("dv", dv, vp.grad)):
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)
  torch.testing.assert_close(softmax_d, (dout * out).sum(-1).transpose(1, 2))


def test_private_varlen_with_dropout_replays_public():
  cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
  q, k, v = (torch.randn(9, n, D, device=DEVICE) for n in (H, HK, HK))
  torch.manual_seed(3)
  out, lse, _, rng = private._flash_attn_varlen_forward(q, k, v, cu, cu, 5, 5, 0.3, None, False)  # pylint: disable=protected-access
  torch.manual_seed(3)
  qp, kp, vp = (t.clone().requires_grad_() for t in (q, k, v))
  pub = torch_bridge.flash_attn_varlen_func(qp, kp, vp, cu, cu, 5, 5, dropout_p=0.3, window_size=np.array([-1, -1]))
  torch.testing.assert_close(out, pub.detach(), rtol=0, atol=0)
  dout = torch.randn_like(out)
  pub.backward(dout)
  dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
  private._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu, cu, 5, 5, 0.3, None, False,  # pylint: disable=protected-access
                                      -1, -1, 0.0, None, False, rng)
  for name, ours, theirs in (("dq", dq, qp.grad), ("dk", dk, kp.grad), ("dv", dv, vp.grad)):
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)
  with pytest.raises(ValueError, match="rng_state: dropout_p > 0"):
    private._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu, cu, 5, 5, 0.3, None,  # pylint: disable=protected-access
                                        False, -1, -1, 0.0, None, False, None)


@pytest.mark.parametrize("window", [torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]), (1,), "ab"])
def test_window_size_rejects_non_pairs(window):
  q = torch.randn(1, 4, 2, 8, device=DEVICE)
  with pytest.raises(ValueError, match=r"window_size: expected a pair \(left, right\) of ints"):
    torch_bridge.flash_attn_func(q, q, q, window_size=window)


def test_compat_import_paths():
  torch_bridge.compat.install()
  try:  # undone after: other tests expect the plain import paths
    from flash_attn.bert_padding import pad_input, unpad_input  # pylint: disable=g-import-not-at-top
    from flash_attn.flash_attn_interface import _flash_attn_forward  # pylint: disable=g-import-not-at-top
    from flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb  # pylint: disable=g-import-not-at-top
  finally:
    torch_bridge.compat.uninstall()
  assert (pad_input, unpad_input, apply_rotary_emb, RotaryEmbedding, _flash_attn_forward) == (
      bert_padding.pad_input, bert_padding.unpad_input, rotary.apply_rotary_emb, rotary.RotaryEmbedding,
      private._flash_attn_forward)  # pylint: disable=protected-access


def test_readme_torch_face_exports():
  """Every torch-face name of the README's table imports from torch_bridge itself."""
  names = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "fa2_func_with_sink",
           "fa3_func_with_sink", "fused_landmark_attention", "FusedLandmarkAttention", "SparseAttention",
           "flash_dma")
  missing = [n for n in names if n not in torch_bridge.__all__ or not hasattr(torch_bridge, n)]
  assert not missing, f"torch_bridge lacks {missing}"
  from torch_bridge import FusedLandmarkAttention, flash_dma, fused_landmark_attention  # pylint: disable=g-import-not-at-top
  assert callable(fused_landmark_attention) and hasattr(FusedLandmarkAttention, "apply")
  assert callable(flash_dma.fwd) and callable(flash_dma.bwd)
