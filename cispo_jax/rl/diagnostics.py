"""The fork-token diagnostic: how much policy-gradient weight each loss removes, token by token.

Every policy loss here sends a token's gradient through its own log-prob: d loss / d params =
g_t * d logp_t / d params, summed over tokens with the aggregation's weight a_t. The reference is
the unclipped importance-sampled policy gradient, the gradient of -r_t A_t: g0_t = -r_t A_t. A
token's kept share is kept_t = g_t / g0_t:

  PPO / GRPO / DAPO   1 inside the clip region, 0 where the clip binds (A > 0, r > 1 + eps_high;
                      A < 0, r < 1 - eps_low) and where a dual clip binds
  CISPO               min(r, cap) / r: never 0 (with cispo_token_mask, 0 where the mask drops)
  SAPO                4 g (1 - g), the soft gate's slope; REINFORCE: 1 / r (no ratio at all)

g_t is not written out per loss: it is the derivative of the registered loss function itself
(one elementwise VJP over [B, T] arrays already computed), so a new loss is accounted for
without a line here, and the tests check it against hand-derived values and against jax.grad of
policy_loss. KL and entropy terms are left out: the question is what the clip does.

Aggregated by sign of A and by ratio bucket (fixed edges, the same for every loss so arms
compare): lo r < 0.8 | mid 0.8..1.2 | hi 1.2..5 | xhi r > 5. Metrics, all fractions:
  diag/tok_<sign>_<bucket>      share of the batch's tokens in the cell
  diag/zeroed_<sign>_<bucket>   share of the batch's tokens in the cell whose gradient is zero
  diag/removed_<sign>_<bucket>  share of the unclipped gradient weight sum_t a_t |g0_t| that the
                                loss removes in the cell, sum a |g0| (1 - kept); negative where it
                                adds weight (CISPO relative mode raises r < 1 - eps_low)
  diag/zeroed, diag/removed     the same over all tokens
  diag/weight                   sum_t a_t |g0_t|, the removed shares' weight over micro-batches and
                                steps (rl/reductions.py); not logged
The fork claim (a) reads off the hi/xhi cells of the positive sign: GRPO/DAPO zero them, CISPO
keeps min(r, cap) / r of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cispo_jax.rl import losses

_sg = jax.lax.stop_gradient

BUCKET_EDGES = (0.8, 1.2, 5.0)
BUCKETS = ("lo", "mid", "hi", "xhi")
SIGNS = ("pos", "neg")
# |g| at or below this share of |g0| counts as zeroed (f32 noise of an exact zero is far smaller).
ZERO_TOL = 1e-6


def token_gradient_weights(logps_BxT, old_logps_BxT, advantages, mask_BxT, cfg: losses.LossConfig,
                           group_ids_B=None) -> dict:
  """Per-token arrays [B, T] (f32, zero off the mask):

    g        d (sum of the loss type's per-token losses) / d logp_t
    g0       -r_t A_t, the unclipped importance-sampled gradient
    kept     g / g0 where g0 != 0, else 1
    agg      the aggregation's weight a_t of token t (up to the common denominator)
    ratio, adv, valid
  """
  cfg = cfg.resolved()
  args = [_sg(jnp.asarray(a)) for a in (logps_BxT, old_logps_BxT, advantages)]
  x, valid, clean = losses.prepare_tokens(*args, mask_BxT, cfg)
  # The clean old log-probs themselves, not logps - log_ratio: where the log-ratio clamp binds that
  # would sit exactly on the clamp, where clip's derivative is a tie instead of the loss's 0.
  old = clean(args[1])
  fn = losses.LOSS_TYPES[cfg.loss_type].fn

  def total(logps):
    log_ratio = jnp.clip(logps - old, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    loss_BxT, _ = fn(x._replace(logps=logps, log_ratio=log_ratio, ratio=jnp.exp(log_ratio)), cfg)
    return jnp.where(valid, loss_BxT, 0.0).sum()

  g = jnp.where(valid, jax.grad(total)(x.logps), 0.0)
  g0 = jnp.where(valid, -x.ratio * x.adv, 0.0)
  live = g0 != 0
  kept = jnp.where(live, g / jnp.where(live, g0, 1.0), 1.0)
  # The aggregations are linear in the per-token loss: their gradient is each token's weight.
  aggregate = losses.AGGREGATIONS[cfg.aggregation]
  agg = jax.grad(lambda l: aggregate(l, x.mask, cfg, group_ids_B)[0])(jnp.zeros_like(x.logps))
  return dict(g=g, g0=g0, kept=kept, agg=jnp.where(valid, agg, 0.0), ratio=x.ratio, adv=x.adv,
              valid=valid)


def cells(ratio_BxT, adv_BxT, valid_BxT) -> dict:
  """{(sign, bucket): bool [B, T]}: the sign-of-advantage x ratio-bucket cells (A = 0 in none)."""
  lo, mid, hi = BUCKET_EDGES
  buckets = dict(lo=ratio_BxT < lo, mid=(ratio_BxT >= lo) & (ratio_BxT <= mid),
                 hi=(ratio_BxT > mid) & (ratio_BxT <= hi), xhi=ratio_BxT > hi)
  signs = dict(pos=valid_BxT & (adv_BxT > 0), neg=valid_BxT & (adv_BxT < 0))
  return {(s, b): signs[s] & buckets[b] for s in SIGNS for b in BUCKETS}


def accounting_metrics(logps_BxT, old_logps_BxT, advantages, mask_BxT, cfg: losses.LossConfig,
                       group_ids_B=None) -> dict:
  """The diag/* metrics (see the module docstring) of one (micro-)batch: scalars, f32."""
  w = token_gradient_weights(logps_BxT, old_logps_BxT, advantages, mask_BxT, cfg, group_ids_B)
  n_tok = jnp.maximum(w["valid"].sum(), 1).astype(jnp.float32)
  w0_BxT = w["agg"] * jnp.abs(w["g0"])
  removed_BxT = w0_BxT * (1.0 - w["kept"])
  w0_total = jnp.maximum(w0_BxT.sum(), 1e-30)
  zeroed_BxT = (w["g0"] != 0) & (jnp.abs(w["g"]) <= ZERO_TOL * jnp.abs(w["g0"]))
  out = {"diag/zeroed": zeroed_BxT.sum() / n_tok, "diag/removed": removed_BxT.sum() / w0_total,
         "diag/weight": w0_BxT.sum()}
  for (s, b), cell in cells(w["ratio"], w["adv"], w["valid"]).items():
    out[f"diag/tok_{s}_{b}"] = cell.sum() / n_tok
    out[f"diag/zeroed_{s}_{b}"] = (cell & zeroed_BxT).sum() / n_tok
    out[f"diag/removed_{s}_{b}"] = jnp.where(cell, removed_BxT, 0.0).sum() / w0_total
  return {k: _sg(v).astype(jnp.float32) for k, v in out.items()}
