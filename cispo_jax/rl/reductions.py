"""How each update metric is reduced, over a step's micro-batches and then over the update's optimizer steps.

Every metric the update makes (policy_loss, the fork-token diagnostic, train_step) is declared in
REDUCTIONS, with one of:

  max / min   the extreme over every token the update saw. A micro-batch or step without tokens
              (num_tokens 0) is left out: its masked max / min is a placeholder 0.
  mean        weighted by another metric of the same micro-batch or step: num_tokens for the masked
              token means, loss_denominator for the aggregated losses, diag/weight for the shares of
              the unclipped gradient weight; so the result is the mean over all tokens (or the pooled
              loss) whatever the split. Without a weight every step counts alike.
  count       summed over micro-batches (the step's count), averaged over steps (per optimizer step).
  sum         summed over steps: skipped_nonfinite, the number of steps skipped.
  weight      a count only the weighted means need: summed over micro-batches, not in the update's output.

A metric not declared is a token mean: every statistic a loss type returns (losses.register_loss) is
averaged over the tokens by policy_loss, so a new loss type needs no line here; the tests check that
every metric of the built-in losses is declared. Weighted means divide the weights by the largest first:
equal weights (every step on the same tokens) give exactly the plain mean sum / count.

`pack` puts an update's reduced metrics (and the few kept per step) into one f32 vector inside the jitted
program, the names staying static on the host side: the metrics come to the host in one transfer.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cispo_jax.rl import diagnostics


class Reduction(NamedTuple):
  kind: str  # max | min | mean | count | sum | weight
  weight: str | None = None  # the metric that weighs it (max / min: which entries have tokens)


TOKENS = "num_tokens"
TOKEN_MEAN = Reduction("mean", TOKENS)
COUNT, WEIGHT = Reduction("count"), Reduction("weight")
_LOSS_MEAN = Reduction("mean", "loss_denominator")
_REMOVED = Reduction("mean", "diag/weight")
_CELLS = [f"{s}_{b}" for s in diagnostics.SIGNS for b in diagnostics.BUCKETS]

REDUCTIONS: dict[str, Reduction] = {
    # policy_loss (losses.py)
    "pg_loss": _LOSS_MEAN, "loss_denominator": WEIGHT, "kl_ref": TOKEN_MEAN, "entropy": TOKEN_MEAN,
    "ratio_mean": TOKEN_MEAN, "approx_kl": TOKEN_MEAN, "ratio_max": Reduction("max", TOKENS),
    "ratio_min": Reduction("min", TOKENS), "num_tokens": COUNT, "num_seqs": COUNT,
    # the built-in loss types' statistics
    **dict.fromkeys(("weight_mean", "clip_frac_low", "clip_frac_high", "clip_frac_region", "clip_frac_dual",
                     "cap_frac_pos_adv", "cap_frac_neg_adv", "token_mask_frac"), TOKEN_MEAN),
    # the fork-token diagnostic (diagnostics.py)
    "diag/zeroed": TOKEN_MEAN, "diag/removed": _REMOVED, "diag/weight": WEIGHT,
    **{f"diag/{kind}_{c}": TOKEN_MEAN for kind in ("tok", "zeroed") for c in _CELLS},
    **{f"diag/removed_{c}": _REMOVED for c in _CELLS},
    # train_step, one value per optimizer step
    "loss": _LOSS_MEAN, "grad_norm": Reduction("mean"), "learning_rate": Reduction("mean"),
    "skipped_nonfinite": Reduction("sum"),
}
# Reduced over the steps from another step metric: {name: (source, reduction)}.
OVER_STEPS_ALSO = {"grad_norm_max": ("grad_norm", Reduction("max"))}


def reduction(name: str) -> Reduction:
  return REDUCTIONS.get(name, TOKEN_MEAN)


def _extreme(x, has, kind):
  fill = -jnp.inf if kind == "max" else jnp.inf
  v = jnp.where(has, x, fill)
  v = v.max(0) if kind == "max" else v.min(0)
  return jnp.where(has.any(0), v, jnp.zeros_like(v))  # no entry with tokens: 0, as policy_loss gives


def _weighted_mean(x, w):
  if w is None:
    return jnp.mean(x, 0)
  top = w.max(0)
  u = jnp.where(top > 0, w / jnp.where(top > 0, top, 1.0), 1.0)  # all weights 0: the plain mean
  return jnp.where(u > 0, x * u, 0.0).sum(0) / u.sum(0)


def _apply(r: Reduction, name: str, x, metrics: dict, over_steps: bool):
  w = None
  if r.weight is not None:
    if r.weight not in metrics:
      raise KeyError(f"metric {name!r} is reduced weighted by {r.weight!r}, which the step did not produce "
                     "(reductions.REDUCTIONS)")
    w = metrics[r.weight]
  if r.kind in ("max", "min"):
    return _extreme(x, jnp.ones(x.shape, bool) if w is None else w > 0, r.kind)
  if r.kind == "mean":
    return _weighted_mean(x, w)
  if r.kind == "count" and over_steps:
    return jnp.mean(x, 0)
  if r.kind in ("count", "sum", "weight"):
    return x.sum(0)
  raise ValueError(f"metric {name!r}: unknown reduction kind {r.kind!r} (reductions.REDUCTIONS)")


def over_micro(metrics: dict) -> dict:
  """{name: [micro_batches]} -> one optimizer step's {name: scalar}."""
  return {k: _apply(reduction(k), k, x, metrics, over_steps=False) for k, x in metrics.items()}


def over_steps(metrics: dict) -> dict:
  """{name: [steps]} -> the update's {name: scalar}; the weights are left out."""
  out = {k: _apply(reduction(k), k, x, metrics, over_steps=True) for k, x in metrics.items()
         if reduction(k).kind != "weight"}
  out.update({k: _apply(r, k, metrics[src], metrics, over_steps=True)
              for k, (src, r) in OVER_STEPS_ALSO.items() if src in metrics})
  return out


@flax.struct.dataclass
class PackedMetrics:
  """An update's metrics as one f32 vector: the reduced ones, then each of `per_step` for every step."""
  values: jax.Array
  names: tuple = flax.struct.field(pytree_node=False)
  per_step: tuple = flax.struct.field(pytree_node=False)

  def unpack(self, host_values) -> tuple[dict, dict]:
    """({name: float} reduced, {name: np.ndarray [steps]}) from `values` fetched to the host."""
    v = np.asarray(host_values)
    k = len(self.names)
    reduced = {name: float(x) for name, x in zip(self.names, v[:k])}
    steps = v[k:].reshape(len(self.per_step), -1) if self.per_step else []
    return reduced, dict(zip(self.per_step, steps))


def pack(reduced: dict, per_step: dict | None = None) -> PackedMetrics:
  per_step = per_step or {}
  parts = [jnp.stack([jnp.asarray(v, jnp.float32) for v in reduced.values()])]
  parts += [jnp.asarray(v, jnp.float32).reshape(-1) for v in per_step.values()]
  return PackedMetrics(jnp.concatenate(parts), tuple(reduced), tuple(per_step))
