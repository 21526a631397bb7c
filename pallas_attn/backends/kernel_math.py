"""Backend-neutral kernel math: what an attention kernel computes on a tile, whatever lowers it.

Functions of register values (jnp arrays of one tile): no loads, stores or layouts, so the flash,
decode and landmark kernels (and any other backend's) compute the same arithmetic, operation for
operation; tests compare paths bit for bit, so a change here changes every kernel alike.

Logits are in the exp2 domain, t * log2(e) (SPEC section 0 for t), so softmaxes use exp2 and lse
converts back with ln 2. Tiles are [rows, cols] (queries by keys), or [cols, rows] where a
function takes `transposed` (the dK/dV pass).
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_attn.spec import LN2, LOG2E

INF = float("inf")


class Scores:
  """Score modifiers: raw = q.k (fp32) -> scale or softcap, then ALiBi's -slope * |i + off - j|.

  mask: the rule whose `off` aligns query rows to key columns (a BandMask; its lengths may be
  traced). slope: fp32, a scalar or anything that broadcasts against the tile ([rows, 1]), None
  without ALiBi. Masking and additive biases are the caller's (they are not scaled or capped).
  """

  def __init__(self, scale: float, softcap: float, mask, slope=None):
    self.scale, self.softcap, self.mask, self.slope = scale, softcap, mask, slope

  def logits(self, raw, rows, cols, transposed: bool = False):
    """(s, th): log2-domain logits of raw scores and, with softcap, the tanh that raw_grad needs."""
    i = rows[None, :] if transposed else rows[:, None]
    j = cols[:, None] if transposed else cols[None, :]
    return self.logits_at(raw, i, j)

  def logits_at(self, raw, i, j, alibi=None):
    """logits() on broadcastable query-row indices i and key indices j (a kernel's own index
    tiles, e.g. Mosaic GPU's register layouts); they are read only with ALiBi. alibi: the tile's
    slope * |i + off - j| in the log2 domain where the caller has it in a cheaper form (then i
    and j are not read)."""
    if self.softcap > 0:
      th = jnp.tanh(raw * (self.scale / self.softcap))
      s = th * (self.softcap * LOG2E)
    else:
      th = None
      s = raw * (self.scale * LOG2E)
    if alibi is not None:
      s = s - alibi
    elif self.slope is not None:
      dist = jnp.abs(i + self.mask.off - j).astype(jnp.float32)
      s = s - (self.slope * LOG2E) * dist
    return s, th

  def raw_grad(self, dt, th):
    """d loss / d raw from d loss / d t (ALiBi and biases are additive, so they drop out)."""
    if self.softcap > 0:
      return dt * ((1.0 - th * th) * self.scale)
    return dt * self.scale


def visible(mask, rows, cols, keep=None, transposed: bool = False):
  """A boundary tile's element test: the mask rule, and where given the dynamic mask's keep."""
  vis = mask.visible(rows, cols, transposed=transposed)
  return vis if keep is None else vis & keep


def sink_seed(z2, rows: int):
  """(m0, l0) [rows]: a running max and sum that start from the sink logits z2 (exp2 domain,
  [s] shared or [rows, s] per row, padding at -inf), as if the sinks were already-seen keys."""
  m0 = jnp.max(z2, axis=-1)
  m0 = jnp.where(m0 == -INF, 0.0, m0)  # rows past the sequence in the per-row layout
  l0 = jnp.sum(jnp.exp2(z2 - m0[..., None] if z2.ndim == 2 else z2 - m0), axis=-1)
  return jnp.broadcast_to(m0, (rows,)), jnp.broadcast_to(l0, (rows,))


def running_max(m_i, tile_max, masked: bool):
  """(m_new, m_use, alpha) after a key tile whose rows reach tile_max: the new running max, the
  shift the tile's exponentials take, and alpha = exp2(m_i - m_use), which rescales what was
  summed before. A row with nothing visible yet (only on masked tiles) keeps m = -inf and shifts
  by 0, so exp2 never sees inf - inf."""
  m_new = jnp.maximum(m_i, tile_max)
  m_use = jnp.where(m_new == -INF, 0.0, m_new) if masked else m_new
  return m_new, m_use, jnp.exp2(m_i - m_use)


def softmax_step(m_i, l_i, s, masked: bool):
  """One key tile of the online softmax over logits s [rows, cols]: (m_new, alpha, p, l_new).

  p = exp2(s - shift) are the tile's unnormalized probabilities; the caller takes
  acc * alpha[:, None] + p @ v (its own product, and dropout on p first where there is any)."""
  m_new, m_use, alpha = running_max(m_i, jnp.max(s, axis=1), masked)
  p = jnp.exp2(s - m_use[:, None])
  return m_new, alpha, p, l_i * alpha + jnp.sum(p, axis=1)


def finish(acc, m_i, l_i, out_scale: float | None = None, empty: float = INF):
  """(out, lse) of rows after the last key tile: acc / l_i (acc * (out_scale / l_i) with a scale,
  e.g. dropout's) and the natural-log lse; rows with l_i == 0 (nothing visible) give out 0 and
  lse `empty` (+inf, the final convention; a split-KV partial uses -inf, the lse merge's identity)."""
  none = l_i == 0.0
  if out_scale is None:
    out = acc / jnp.where(none, 1.0, l_i)[:, None]
  else:
    out = acc * (out_scale / jnp.where(none, 1.0, l_i))[:, None]
  return out, jnp.where(none, empty, (m_i + jnp.log2(jnp.where(none, 1.0, l_i))) * LN2)


def o_dot_do(o, do):
  """rowsum(O * dO) in fp32 [rows]: delta, before an lse cotangent is subtracted (d lse / d t = P,
  so it folds in as delta - dlse)."""
  return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1)


def logit_grad(p, pd, dp, delta):
  """d loss / d t over the dropout scale: P * (keep * dP - delta), delta broadcast against the
  tile. pd is P with the dropped entries zeroed (P itself without dropout); the keep mask itself
  need not stay live across dP's product."""
  if pd is p:
    return p * (dp - delta)
  return pd * dp - p * delta


def sink_grad(z2, lse2, delta):
  """[rows, s] contributions to dsink: d lse / d z = exp(z - lse) for each sink logit z, so
  dsink = -sum_rows exp(z - lse) * delta (z2 [1, s] or [rows, s] and lse2 in the exp2 domain)."""
  return -jnp.exp2(z2 - lse2[:, None]) * delta[:, None]
