"""Policy losses for RL on language models: CISPO and the GRPO family, as pure JAX functions.

The project's one epsilon convention
------------------------------------
r = exp(clamp(logp - old_logp, +-log_ratio_clamp)) is the per-token importance ratio.

* ``epsilon_low`` is always relative: the lower bound is ``1 - epsilon_low``.
* ``epsilon_high`` is relative (upper bound ``1 + epsilon_high``) for every PPO-style loss, and
  an ABSOLUTE cap for ``cispo`` in its default ``cispo_mode="absolute"`` (the seed):
  ``w = stop_gradient(min(r, epsilon_high))``, default 5.0, loss ``-w * A * logp``.
  A cap below 1 would clamp every on-policy token (peers that reuse PPO's 0.2 default fall into
  this), so it is refused; use ``cispo_mode="relative"`` for the MiniMax-M1 general form
  ``w = stop_gradient(clip(r, 1 - epsilon_low, 1 + epsilon_high))``.
  cispo's ``epsilon_low`` defaults to 1.0 (lower bound 0, i.e. no lower clip, as MiniMax-M1 ran
  it); relative mode's ``epsilon_high`` defaults to 4.0 so that both modes cap at 5.0.
  ``cispo_token_mask`` is MiniMax-M1's mask M: it drops tokens with A > 0 and r above the upper
  bound, or A < 0 and r below the lower bound (the tokens PPO's clip would zero).

Loss types (defaults: aggregation, epsilon_low / epsilon_high):
  cispo      token-mean,              1.0 / 5.0 (absolute cap)
  grpo, ppo  seq-mean-token-mean / token-mean, 0.2 / 0.2, optional dual clip (c > 1, A < 0)
  dapo       token-mean,              0.2 / 0.28 (clip-higher)
  dr_grpo    seq-mean-token-sum-norm, 0.2 / 0.2 (needs max_completion_length)
  bnpo       token-mean,              0.2 / 0.2
  gspo       seq-mean-token-mean,     3e-4 / 4e-4, sequence ratio s_i = exp(mean_t log r), used
             per token as sg(s_i) * exp(logp - sg(logp)) (GSPO-token), arXiv:2507.18071
  sapo       seq-mean-token-mean, no epsilons: loss -f(r) A, f(r) = sigmoid(tau (r-1)) * 4/tau,
             tau = sapo_tau_pos (1.0) if A > 0 else sapo_tau_neg (1.05), arXiv:2511.20347
  reinforce  token-mean, no ratio: -A * logp

Aggregations return (loss_sum, denominator); the loss is loss_sum / denominator, divided once:
  token-mean               sum_bt l / #tokens
  seq-mean-token-mean      sum_b (sum_t l / n_b) / #sequences with >= 1 token
  seq-mean-token-sum       sum_bt l / #sequences
  seq-mean-token-sum-norm  sum_bt l / (#sequences * max_completion_length)   (Dr.GRPO)
  prompt-mean              sum_g (sum_{b in g, t} l / N_g) / #groups with tokens (ScaleRL)
Micro-batches and data-parallel shards add sums and denominators (prompt-mean: split along
prompt groups), which reproduces the full batch exactly.

A new loss is one function registered by name: `@register_loss("name", aggregation=...)` over
`(Tokens, LossConfig) -> (loss_BxT, stats)`; a new aggregation likewise with register_aggregation.

The KL penalty (kl_coef * k1|k2|k3 of current vs reference) and the entropy bonus
(-entropy_coef * entropy) are per-token terms aggregated with the same rule.
"""

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cispo_jax.rl.aggregation import AGGREGATIONS, KL_ESTIMATORS, register_aggregation  # noqa: F401 (API)

_sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class LossConfig:
  loss_type: str = "cispo"
  aggregation: str | None = None  # None: the loss type's default
  epsilon_low: float | None = None  # None: the loss type's default
  epsilon_high: float | None = None  # None: the loss type's default (cispo absolute: 5.0)
  cispo_mode: str = "absolute"  # "absolute" | "relative", see the module docstring
  cispo_token_mask: bool = False  # MiniMax-M1 mask M
  dual_clip: float | None = None  # PPO dual clip c > 1, bounds the loss of A < 0 tokens
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  entropy_coef: float = 0.0
  max_completion_length: int | None = None  # Dr.GRPO's constant normaliser
  sapo_tau_pos: float = 1.0  # SAPO paper defaults: a softer gate for A > 0 ...
  sapo_tau_neg: float = 1.05  # ... and a faster decay for A < 0
  log_ratio_clamp: float = 20.0

  def resolved(self) -> "LossConfig":
    """Defaults filled in and everything validated; idempotent."""
    _check_choice("loss_type", self.loss_type, LOSS_TYPES)
    spec = LOSS_TYPES[self.loss_type]
    aggregation = self.aggregation if self.aggregation is not None else spec.aggregation
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("cispo_mode", self.cispo_mode, ("absolute", "relative"))
    _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
    is_cispo = self.loss_type == "cispo"
    lo, hi = self.epsilon_low, self.epsilon_high
    if spec.epsilon_high is None:  # the loss has no clip range
      for name, v in (("epsilon_low", lo), ("epsilon_high", hi)):
        if v is not None:
          users = sorted(k for k, s in LOSS_TYPES.items() if s.epsilon_high is not None)
          raise ValueError(f"LossConfig.{name}={v} is not used by loss_type={self.loss_type!r}; "
                           f"leave it None (loss types with a clip range: {users})")
    else:
      lo = spec.epsilon_low if lo is None else lo
      if hi is None:
        hi = 4.0 if is_cispo and self.cispo_mode == "relative" else spec.epsilon_high
      for name, v in (("epsilon_low", lo), ("epsilon_high", hi)):
        if not v > 0:
          raise ValueError(f"LossConfig.{name}={v} must be > 0 (allowed: positive floats)")
    if is_cispo and self.cispo_mode == "absolute" and hi < 1.0:
      raise ValueError(
          f"LossConfig.epsilon_high={hi} with loss_type='cispo', cispo_mode='absolute' is the "
          "absolute cap of the IS weight w = min(r, epsilon_high); a cap < 1 clamps every "
          "on-policy token (r = 1). Convention: cispo absolute caps at epsilon_high (allowed: "
          ">= 1, default 5.0); PPO-style losses clip r to [1-epsilon_low, 1+epsilon_high]. For a "
          "relative clip use cispo_mode='relative' (allowed cispo_mode: ['absolute', 'relative'])")
    if self.cispo_token_mask and not is_cispo:
      raise ValueError(f"LossConfig.cispo_token_mask=True applies only to loss_type='cispo', "
                       f"got loss_type={self.loss_type!r}")
    if self.dual_clip is not None:
      if not spec.dual_clip:
        users = sorted(k for k, s in LOSS_TYPES.items() if s.dual_clip)
        raise ValueError(f"LossConfig.dual_clip applies only to loss types {users}, got "
                         f"loss_type={self.loss_type!r}")
      if not self.dual_clip > 1.0:
        raise ValueError(f"LossConfig.dual_clip={self.dual_clip} must be > 1 (or None)")
    if aggregation == "seq-mean-token-sum-norm":
      L = self.max_completion_length
      if not (isinstance(L, int) and L > 0):
        raise ValueError(f"LossConfig.max_completion_length={L!r} must be a positive int with "
                         "aggregation='seq-mean-token-sum-norm' (Dr.GRPO's constant normaliser)")
    for name in ("sapo_tau_pos", "sapo_tau_neg", "log_ratio_clamp"):
      if not getattr(self, name) > 0:
        raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be > 0")
    if not self.kl_coef >= 0:
      raise ValueError(f"LossConfig.kl_coef={self.kl_coef} must be >= 0")
    return dataclasses.replace(self, aggregation=aggregation, epsilon_low=lo, epsilon_high=hi)


class LossOutput(NamedTuple):
  loss_sum: jax.Array  # what micro-batches / shards add up
  denominator: jax.Array  # likewise; loss = sum of loss_sums / sum of denominators
  loss: jax.Array  # loss_sum / max(denominator, tiny)
  metrics: dict  # name -> scalar f32


class Tokens(NamedTuple):
  """What a loss type sees: f32 [B, T] arrays, masked positions already zeroed."""
  logps: jax.Array
  log_ratio: jax.Array  # clamped logp - old_logp
  ratio: jax.Array
  adv: jax.Array
  mask: jax.Array  # 1.0 on completion tokens


# A loss type maps (Tokens, resolved cfg) to (per-token loss [B,T], per-token stats {name: [B,T]}).
# Stats become metrics (masked token means) under their own names. Every loss gives weight_mean
# (its clipped importance weight: cispo's w, PPO's clip(r), SAPO's gate slope d f / d logp) and
# clip_frac_{low,high,region}.
LossFn = Callable[[Tokens, LossConfig], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
  fn: LossFn
  aggregation: str
  epsilon_low: float | None
  epsilon_high: float | None
  dual_clip: bool  # accepts LossConfig.dual_clip


LOSS_TYPES: dict[str, LossSpec] = {}


def register_loss(name, *, aggregation, epsilon_low=None, epsilon_high=None, dual_clip=False):
  def deco(fn):
    LOSS_TYPES[name] = LossSpec(fn, aggregation, epsilon_low, epsilon_high, dual_clip)
    return fn
  return deco


def _check_choice(field, value, allowed):
  if value not in allowed:
    raise ValueError(f"LossConfig.{field}={value!r} is not one of {sorted(allowed)}")


def no_clip_stats(weight):
  """Stats of a loss without a clip range: its weight and zero clip fractions."""
  z = jnp.zeros_like(weight)
  return dict(weight_mean=weight, clip_frac_low=z, clip_frac_high=z, clip_frac_region=z)


def _clipped_surrogate(ratio, adv, lo, hi, dual_clip):
  """PPO: -min(r A, clip(r) A), optionally bounded by -c A for A < 0 (dual clip)."""
  clipped = jnp.clip(ratio, lo, hi)
  loss = jnp.maximum(-ratio * adv, -clipped * adv)
  low = (ratio < lo) & (adv < 0)  # binding clips: these tokens get no gradient
  high = (ratio > hi) & (adv > 0)
  stats = dict(weight_mean=clipped, clip_frac_low=low, clip_frac_high=high,
               clip_frac_region=low | high)
  if dual_clip is not None:
    dual = (adv < 0) & (loss > -dual_clip * adv)
    loss = jnp.where(dual, -dual_clip * adv, loss)
    stats["clip_frac_dual"] = dual
  return loss, stats


def _ppo(x: Tokens, cfg: LossConfig):
  return _clipped_surrogate(x.ratio, x.adv, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high,
                            cfg.dual_clip)


for _name, _agg, _hi in (("grpo", "seq-mean-token-mean", 0.2), ("ppo", "token-mean", 0.2),
                         ("dapo", "token-mean", 0.28), ("dr_grpo", "seq-mean-token-sum-norm", 0.2),
                         ("bnpo", "token-mean", 0.2)):
  register_loss(_name, aggregation=_agg, epsilon_low=0.2, epsilon_high=_hi, dual_clip=True)(_ppo)


@register_loss("cispo", aggregation="token-mean", epsilon_low=1.0, epsilon_high=5.0)
def _cispo(x: Tokens, cfg: LossConfig):
  lo = 1.0 - cfg.epsilon_low
  hi = cfg.epsilon_high if cfg.cispo_mode == "absolute" else 1.0 + cfg.epsilon_high
  w = _sg(jnp.clip(x.ratio, lo, hi))  # no gradient through the weight: all of it is in logp
  loss = -w * x.adv * x.logps
  capped, raised = x.ratio > hi, x.ratio < lo
  stats = dict(weight_mean=w, clip_frac_low=raised, clip_frac_high=capped,
               clip_frac_region=capped | raised, cap_frac_pos_adv=capped & (x.adv > 0),
               cap_frac_neg_adv=capped & (x.adv < 0))
  if cfg.cispo_token_mask:
    drop = (capped & (x.adv > 0)) | (raised & (x.adv < 0))
    loss = jnp.where(drop, 0.0, loss)
    stats["token_mask_frac"] = drop
  return loss, stats


@register_loss("gspo", aggregation="seq-mean-token-mean", epsilon_low=3e-4, epsilon_high=4e-4,
               dual_clip=True)
def _gspo(x: Tokens, cfg: LossConfig):
  n_B = x.mask.sum(-1)
  seq_log_ratio_B = (x.log_ratio * x.mask).sum(-1) / jnp.maximum(n_B, 1.0)
  seq_ratio_B = jnp.exp(jnp.clip(seq_log_ratio_B, -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
  # Value s_i on every token, gradient s_i * grad logp_t: GSPO-token, equal to GSPO's sequence
  # gradient under seq-mean-token-mean and open to per-token advantages.
  s_BxT = _sg(seq_ratio_B)[:, None] * jnp.exp(x.logps - _sg(x.logps))
  return _clipped_surrogate(s_BxT, x.adv, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high,
                            cfg.dual_clip)


@register_loss("sapo", aggregation="seq-mean-token-mean")
def _sapo(x: Tokens, cfg: LossConfig):
  tau = jnp.where(x.adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
  gate = jax.nn.sigmoid(tau * (x.ratio - 1.0))
  loss = -gate * (4.0 / tau) * x.adv
  # d f / d logp = 4 gate (1 - gate) r: 1 on-policy, decaying smoothly off-policy.
  return loss, no_clip_stats(_sg(4.0 * gate * (1.0 - gate) * x.ratio))


@register_loss("reinforce", aggregation="token-mean")
def _reinforce(x: Tokens, cfg: LossConfig):
  del cfg
  return -x.adv * x.logps, no_clip_stats(jnp.ones_like(x.logps))


# ------------------------------------------------------------------------------ KL, entropy, API



def _check_shape(name, x, shape):
  if x is not None and tuple(x.shape) not in shape:
    raise ValueError(f"{name} has shape {tuple(x.shape)}; allowed: {' or '.join(map(str, shape))} "
                     "(from mask_BxT)")


def _masked_stats(x_BxT, mask_BxT, n):
  valid = mask_BxT > 0
  mean = (jnp.where(valid, x_BxT, 0.0)).sum() / jnp.maximum(n, 1.0)
  lo = jnp.where(n > 0, jnp.where(valid, x_BxT, jnp.inf).min(), 0.0)
  hi = jnp.where(n > 0, jnp.where(valid, x_BxT, -jnp.inf).max(), 0.0)
  return mean, lo, hi


def prepare_tokens(logps_BxT, old_logps_BxT, advantages, mask_BxT, cfg: LossConfig):
  """(Tokens, valid_BxT, clean): what a loss type sees, f32, with padded positions zeroed.

  cfg must be resolved. Shared by policy_loss and diagnostics.py, so both see the same ratio.
  """
  B, T = mask_BxT.shape
  valid = mask_BxT > 0
  # jnp.where, not a product: garbage (inf/nan) at padded positions must not reach values or grads.
  clean = lambda x: jnp.where(valid, x.astype(jnp.float32), 0.0)  # noqa: E731
  logps, old_logps = clean(logps_BxT), clean(old_logps_BxT)
  adv = advantages.astype(jnp.float32)
  adv = clean(adv if adv.ndim == 2 else jnp.broadcast_to(adv[:, None], (B, T)))
  log_ratio = jnp.clip(logps - old_logps, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
  return Tokens(logps, log_ratio, jnp.exp(log_ratio), adv, valid.astype(jnp.float32)), valid, clean


def policy_loss(logps_BxT, old_logps_BxT, advantages, mask_BxT, cfg: LossConfig, *,
                ref_logps_BxT=None, entropy_BxT=None, group_ids_B=None) -> LossOutput:
  """The policy loss of one (micro-)batch; see the module docstring for the conventions.

  advantages: [B] (per sequence) or [B, T]. group_ids_B: prompt index per row, needed only for
  aggregation="prompt-mean". Everything is computed in f32; masked tokens influence nothing.
  """
  cfg = cfg.resolved()
  B, T = mask_BxT.shape
  _check_shape("logps_BxT", logps_BxT, [(B, T)])
  _check_shape("old_logps_BxT", old_logps_BxT, [(B, T)])
  _check_shape("advantages", advantages, [(B,), (B, T)])
  _check_shape("ref_logps_BxT", ref_logps_BxT, [(B, T)])
  _check_shape("entropy_BxT", entropy_BxT, [(B, T)])
  _check_shape("group_ids_B", group_ids_B, [(B,)])
  if cfg.kl_coef > 0 and ref_logps_BxT is None:
    raise ValueError(f"LossConfig.kl_coef={cfg.kl_coef} > 0 needs ref_logps_BxT")
  if cfg.entropy_coef != 0 and entropy_BxT is None:
    raise ValueError(f"LossConfig.entropy_coef={cfg.entropy_coef} != 0 needs entropy_BxT")
  if cfg.aggregation == "prompt-mean" and group_ids_B is None:
    raise ValueError("aggregation='prompt-mean' needs group_ids_B (prompt index per row)")
  if cfg.aggregation == "seq-mean-token-sum-norm" and T > cfg.max_completion_length:
    raise ValueError(f"mask_BxT has {T} tokens per row > LossConfig.max_completion_length="
                     f"{cfg.max_completion_length}")

  x, valid, clean = prepare_tokens(logps_BxT, old_logps_BxT, advantages, mask_BxT, cfg)
  logps, log_ratio, ratio, mask = x.logps, x.log_ratio, x.ratio, x.mask

  pg_BxT, stats = LOSS_TYPES[cfg.loss_type].fn(x, cfg)
  pg_BxT = jnp.where(valid, pg_BxT, 0.0)
  aggregate = lambda l_BxT: AGGREGATIONS[cfg.aggregation](l_BxT, mask, cfg, group_ids_B)
  token_loss_BxT = pg_BxT
  n = mask.sum()
  metrics = {}
  if ref_logps_BxT is not None:
    d = jnp.clip(clean(ref_logps_BxT) - logps, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    kl_BxT = jnp.where(valid, KL_ESTIMATORS[cfg.kl_estimator](d), 0.0)
    metrics["kl_ref"] = kl_BxT.sum() / jnp.maximum(n, 1.0)
    if cfg.kl_coef > 0:
      token_loss_BxT = token_loss_BxT + cfg.kl_coef * kl_BxT
  if entropy_BxT is not None:
    ent_BxT = clean(entropy_BxT)
    metrics["entropy"] = ent_BxT.sum() / jnp.maximum(n, 1.0)
    if cfg.entropy_coef != 0:
      token_loss_BxT = token_loss_BxT - cfg.entropy_coef * ent_BxT

  loss_sum, denominator = aggregate(token_loss_BxT)
  denominator = denominator.astype(jnp.float32)
  safe_den = jnp.maximum(denominator, 1e-8)
  metrics["pg_loss"] = aggregate(pg_BxT)[0] / safe_den
  metrics["loss_denominator"] = denominator  # pg_loss's weight over micro-batches (rl/reductions.py)
  for name, v in stats.items():
    metrics[name] = _masked_stats(v.astype(jnp.float32), mask, n)[0]
  metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"] = _masked_stats(ratio, mask, n)
  # k3 of old vs new on tokens sampled from old: (r - 1) - log r estimates KL(old || new).
  metrics["approx_kl"] = _masked_stats(ratio - 1.0 - log_ratio, mask, n)[0]
  metrics["num_tokens"] = n
  metrics["num_seqs"] = (mask.sum(-1) > 0).sum().astype(jnp.float32)
  metrics = {k: _sg(v).astype(jnp.float32) for k, v in metrics.items()}
  return LossOutput(loss_sum, denominator, loss_sum / safe_den, metrics)
