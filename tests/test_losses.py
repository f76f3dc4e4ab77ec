"""Policy-loss core: the CISPO mechanism, the GRPO family, aggregation and deferred division."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax.model import logprobs
from cispo_jax.rl import losses
from cispo_jax.rl.losses import AGGREGATIONS, LOSS_TYPES, LossConfig, policy_loss

B, T, L_MAX = 8, 6, 16  # 4 prompts x 2 completions; L_MAX leaves room for padded columns
LENGTHS = np.array([6, 3, 0, 0, 4, 6, 2, 5])  # prompt "2" (rows 2, 3) has no tokens at all
GROUP_IDS = np.array([5, 5, 2, 2, 9, 9, 0, 0])  # arbitrary ids, contiguous groups


def _cfg(loss_type="cispo", **kw):
  if kw.get("aggregation") == "seq-mean-token-sum-norm" or (
      loss_type == "dr_grpo" and kw.get("aggregation") is None):
    kw.setdefault("max_completion_length", L_MAX)
  return LossConfig(loss_type=loss_type, **kw)


def _batch(seed=0, per_token_adv=False):
  rng = np.random.default_rng(seed)
  mask = (np.arange(T)[None] < LENGTHS[:, None]).astype(np.float32)
  old = rng.uniform(-3.0, -0.1, (B, T))
  log_ratio = rng.normal(0.0, 0.6, (B, T))
  log_ratio[0, 0], log_ratio[1, 1], log_ratio[4, 2] = 2.2, -1.0, 1.9  # beyond every clip / cap
  adv = rng.normal(size=(B, T) if per_token_adv else B)
  return dict(logps=jnp.asarray(old + log_ratio, jnp.float32), old=jnp.asarray(old, jnp.float32),
              adv=jnp.asarray(adv, jnp.float32), mask=jnp.asarray(mask),
              ref=jnp.asarray(old + rng.normal(0, 0.3, (B, T)), jnp.float32),
              ent=jnp.asarray(rng.uniform(0.5, 2.0, (B, T)), jnp.float32),
              gids=jnp.asarray(GROUP_IDS, jnp.int32))


def _runner(cfg):
  """value_and_grad of loss_sum w.r.t. logps. Eager on purpose: the primitives' compilations are
  shared by every config, where a jit would compile once per (config, shape): minutes, not
  seconds. test_jit_matches_eager covers the jitted path."""
  def f(d):
    def loss_sum(logps):
      out = policy_loss(logps, d["old"], d["adv"], d["mask"], cfg, ref_logps_BxT=d.get("ref"),
                        entropy_BxT=d.get("ent"), group_ids_B=d.get("gids"))
      return out.loss_sum, out
    (_, out), g = jax.value_and_grad(loss_sum, has_aux=True)(d["logps"])
    return out, g
  return f


def run(cfg, d):
  """(LossOutput, gradient of the scalar loss w.r.t. logps)."""
  out, g_sum = _runner(cfg)(d)
  return out, g_sum / out.denominator


def _np(x):
  return np.asarray(x, np.float64)


@pytest.fixture(scope="module")
def batch():
  return _batch()


# ------------------------------------------------------------------------- the CISPO mechanism

@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("mode,kw,bounds", [
    ("absolute", {}, (0.0, 5.0)),
    ("absolute", dict(epsilon_high=2.0), (0.0, 2.0)),
    ("relative", dict(epsilon_low=0.2, epsilon_high=0.28), (0.8, 1.28)),
])
def test_cispo_grad_is_minus_capped_weight_times_adv(mode, kw, bounds, per_token_adv):
  d = _batch(per_token_adv=per_token_adv)
  out, g = run(_cfg(cispo_mode=mode, **kw), d)
  r = np.exp(_np(d["logps"]) - _np(d["old"]))
  adv = _np(d["adv"]) if per_token_adv else _np(d["adv"])[:, None]
  expected = -np.clip(r, *bounds) * adv * _np(d["mask"]) / _np(d["mask"]).sum()
  assert float(out.denominator) == LENGTHS.sum()
  assert (r * _np(d["mask"]) > bounds[1]).any()  # the cap is exercised
  np.testing.assert_allclose(_np(g), expected, rtol=1e-5, atol=1e-7)


def _one_token(log_ratio, adv, logp=-1.0):
  return dict(logps=jnp.array([[logp]]), old=jnp.array([[logp - log_ratio]]),
              adv=jnp.array([adv], jnp.float32), mask=jnp.ones((1, 1)))


@pytest.mark.parametrize("r,adv", [(1.5, 1.0), (8.0, 1.0), (0.5, -1.0)])
def test_clipped_token_dead_under_grpo_dapo_alive_under_cispo(r, adv):
  d = _one_token(np.log(r), adv)
  for lt in ("grpo", "dapo"):
    assert float(run(_cfg(lt), d)[1][0, 0]) == 0.0, lt
  g = float(run(_cfg("cispo"), d)[1][0, 0])
  assert g == pytest.approx(-min(r, 5.0) * adv, rel=1e-6) and g != 0.0


def _binding_or_inside_batch():
  """Ratios either inside [0.8, 1.28] or beyond it on the side where PPO's clip binds."""
  d = _batch(seed=1, per_token_adv=True)
  rng = np.random.default_rng(3)
  adv = _np(d["adv"])
  inside = np.log(rng.uniform(0.85, 1.25, (B, T)))
  beyond = np.where(adv > 0, np.log(rng.uniform(1.4, 9.0, (B, T))),
                    np.log(rng.uniform(0.05, 0.7, (B, T))))
  log_ratio = np.where(rng.uniform(size=(B, T)) < 0.5, inside, beyond)
  return dict(d, logps=jnp.asarray(_np(d["old"]) + log_ratio, jnp.float32))


def test_cispo_token_mask_equals_ppo_gradient():
  d = _binding_or_inside_batch()
  eps = dict(epsilon_low=0.2, epsilon_high=0.28, aggregation="token-mean")
  masked = _cfg("cispo", cispo_mode="relative", cispo_token_mask=True, **eps)
  _, g_cispo = run(masked, d)
  _, g_ppo = run(_cfg("ppo", **eps), d)
  np.testing.assert_allclose(_np(g_cispo), _np(g_ppo), rtol=1e-5, atol=1e-7)
  assert np.count_nonzero(_np(g_ppo)) < np.count_nonzero(_np(d["mask"]))  # some tokens dropped
  _, g_unmasked = run(dataclasses.replace(masked, cispo_token_mask=False), d)
  assert not np.allclose(_np(g_unmasked), _np(g_ppo))  # the mask is what makes them equal


def test_cispo_mask_keeps_nonbinding_tokens_at_clipped_weight():
  # A > 0 with r < 1-eps: PPO's clip does not bind (gradient -r A), CISPO keeps the token with
  # its clipped weight 1-eps (MiniMax-M1's form), so the two differ there by design.
  d = _one_token(np.log(0.5), 1.0)
  eps = dict(epsilon_low=0.2, epsilon_high=0.28)
  g_cispo = run(_cfg("cispo", cispo_mode="relative", cispo_token_mask=True, **eps), d)[1]
  g_ppo = run(_cfg("ppo", **eps), d)[1]
  assert float(g_cispo[0, 0]) == pytest.approx(-0.8) and float(g_ppo[0, 0]) == pytest.approx(-0.5)


def _per_token_normaliser(cfg, mask):
  n_B = mask.sum(-1, keepdims=True)
  n_seq = (n_B > 0).sum()
  return {"token-mean": np.full_like(mask, mask.sum()),
          "seq-mean-token-mean": n_B * n_seq,
          "seq-mean-token-sum": np.full_like(mask, n_seq),
          "seq-mean-token-sum-norm": np.full_like(mask, n_seq * L_MAX)}[cfg.aggregation]


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_on_policy_gradients_agree_up_to_normaliser(loss_type, batch):
  d = dict(batch, logps=batch["old"])  # r = 1
  cfg = _cfg(loss_type).resolved()
  _, g = run(cfg, d)
  mask = _np(d["mask"])
  expected = -_np(d["adv"])[:, None] * mask
  np.testing.assert_allclose(_np(g) * _per_token_normaliser(cfg, mask), expected, rtol=1e-5,
                             atol=1e-6)


def test_on_policy_cispo_grpo_dapo_bnpo_identical_under_one_aggregation(batch):
  d = dict(batch, logps=batch["old"])
  grads = [run(_cfg(lt, aggregation="seq-mean-token-mean"), d)[1]
           for lt in ("cispo", "grpo", "dapo", "bnpo")]
  for g in grads[1:]:
    np.testing.assert_allclose(_np(g), _np(grads[0]), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------- deferred division and padding

def _split(d, k):
  return [{n: v[i * B // k:(i + 1) * B // k] for n, v in d.items()} for i in range(k)]


def _check_split(cfg, d, k):
  out, g = run(cfg, d)
  parts = [_runner(cfg)(p) for p in _split(d, k)]
  total_sum = sum(float(o.loss_sum) for o, _ in parts)
  total_den = sum(float(o.denominator) for o, _ in parts)
  assert total_den == pytest.approx(float(out.denominator), rel=1e-7)
  assert total_sum / total_den == pytest.approx(float(out.loss), rel=1e-6, abs=1e-6)
  g_split = np.concatenate([_np(gs) for _, gs in parts]) / total_den
  np.testing.assert_allclose(g_split, _np(g), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_micro_batches_reproduce_full_batch(aggregation, k, batch):
  cfg = _cfg("cispo", aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01)
  _check_split(cfg, batch, k)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_micro_batches_reproduce_full_batch_every_loss_type(loss_type):
  _check_split(_cfg(loss_type), _batch(seed=2, per_token_adv=True), 4)


def _pad(d, extra_cols=3):
  """Garbage in every padded slot: an extra empty row and extra masked columns."""
  def pad(x, fill):
    if x.ndim == 1:
      return jnp.concatenate([x, jnp.full((1,), fill, x.dtype)])
    x = jnp.concatenate([x, jnp.full((x.shape[0], extra_cols), fill, x.dtype)], axis=1)
    return jnp.concatenate([x, jnp.full((1, x.shape[1]), fill, x.dtype)], axis=0)
  return dict(logps=pad(d["logps"], jnp.nan), old=pad(d["old"], -1e30), ref=pad(d["ref"], jnp.inf),
              ent=pad(d["ent"], jnp.nan), mask=pad(d["mask"], 0.0), gids=pad(d["gids"], 77),
              adv=pad(d["adv"], 1e6))


@pytest.mark.parametrize("loss_type,aggregation", [(lt, None) for lt in sorted(LOSS_TYPES)]
                         + [("grpo", "prompt-mean"), ("cispo", "seq-mean-token-sum")])
def test_padding_changes_nothing(loss_type, aggregation, batch):
  cfg = _cfg(loss_type, aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01)
  out, g = run(cfg, batch)
  out_p, g_p = run(cfg, _pad(batch))
  for field in ("loss_sum", "denominator", "loss"):
    assert float(getattr(out_p, field)) == pytest.approx(float(getattr(out, field)), rel=1e-6)
  np.testing.assert_allclose(_np(g_p)[:B, :T], _np(g), rtol=1e-6, atol=1e-7)
  assert np.all(_np(g_p)[B:] == 0) and np.all(_np(g_p)[:, T:] == 0)
  assert out_p.metrics.keys() == out.metrics.keys()
  for k in out.metrics:
    assert float(out_p.metrics[k]) == pytest.approx(float(out.metrics[k]), rel=1e-6, abs=1e-7), k


# ------------------------------------------------------------------------ each loss type's form

def test_gspo_uses_the_length_normalised_sequence_ratio():
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
  old = jnp.full((3, 4), -1.0)
  # sequence log-ratios: 1e-4 (inside), 0.01 (beyond 1+4e-4), 0.01 (beyond, but A < 0)
  lr = jnp.array([[3e-4, -2e-4, 2e-4, 5.0], [0.03, -0.01, 0, 0], [0.01, 0.01, 0.01, 0.01]])
  adv = jnp.array([1.0, 2.0, -1.0])
  out, g = run(_cfg("gspo"), dict(logps=old + lr, old=old, adv=adv, mask=mask))
  s = np.exp([1e-4, 0.01, 0.01])
  expected = np.array([[-s[0] / 3] * 3 + [0], [0] * 4, [s[2] / 4] * 4]) / 3  # / (n_i * #seqs)
  np.testing.assert_allclose(_np(g), expected, rtol=1e-5, atol=1e-9)
  assert float(out.metrics["clip_frac_high"]) == pytest.approx(2 / 9)  # row 1's two tokens


def test_sapo_soft_gate(batch):
  d = dict(batch, adv=batch["adv"].at[0].set(0.7).at[1].set(-0.7))
  out, g = run(_cfg("sapo"), d)
  r = np.exp(_np(d["logps"]) - _np(d["old"]))
  adv = _np(d["adv"])[:, None]
  tau = np.where(adv > 0, 1.0, 1.05)
  gate = 1.0 / (1.0 + np.exp(-tau * (r - 1.0)))
  mask = _np(d["mask"])
  norm = np.maximum(_per_token_normaliser(_cfg("sapo").resolved(), mask), 1.0)
  np.testing.assert_allclose(_np(g), -4 * gate * (1 - gate) * r * adv * mask / norm, rtol=1e-5,
                             atol=1e-7)
  loss = (-gate * 4 / tau * adv * mask / norm).sum()
  assert float(out.loss) == pytest.approx(loss, rel=1e-5)


def test_reinforce_ignores_the_ratio(batch):
  out, g = run(_cfg("reinforce"), batch)
  mask, adv = _np(batch["mask"]), _np(batch["adv"])[:, None]
  np.testing.assert_allclose(_np(g), -adv * mask / mask.sum(), rtol=1e-6)
  assert float(out.loss) == pytest.approx((-adv * _np(batch["logps"]) * mask).sum() / mask.sum(),
                                          rel=1e-5)


def test_ppo_dual_clip_bounds_negative_advantage_loss():
  d = dict(logps=jnp.log(jnp.array([[5.0, 2.0, 5.0]])), old=jnp.zeros((1, 3)),
           adv=jnp.array([[-1.0, -1.0, 1.0]]), mask=jnp.ones((1, 3)))
  out, g = run(_cfg("ppo", dual_clip=3.0), d)
  # per token: min(3, 5) * 1 (clipped, no grad); 2 * 1; -min(5, 1.2) * 1 (clipped, no grad)
  assert float(out.loss_sum) == pytest.approx(3.0 + 2.0 - 1.2, rel=1e-6)
  np.testing.assert_allclose(_np(g), [[0.0, 2.0 / 3, 0.0]], atol=1e-7)
  assert float(out.metrics["clip_frac_dual"]) == pytest.approx(1 / 3)


def test_aggregation_denominators_and_values():
  # reinforce with logp = 1 makes each token's loss -A: easy hand sums.
  mask = jnp.asarray((np.arange(T)[None] < LENGTHS[:, None]).astype(np.float32))
  adv = jnp.arange(1.0, B + 1.0)
  d = dict(logps=jnp.ones((B, T)), old=jnp.ones((B, T)), adv=adv, mask=mask,
           gids=jnp.asarray(GROUP_IDS))
  n = LENGTHS
  seq = n > 0
  by_group = [(-(adv[2 * g] * n[2 * g] + adv[2 * g + 1] * n[2 * g + 1]), n[2 * g] + n[2 * g + 1])
              for g in range(4)]
  expected = {
      "token-mean": (-(adv * n).sum(), n.sum()),
      "seq-mean-token-mean": (-adv[seq].sum(), seq.sum()),
      "seq-mean-token-sum": (-(adv * n).sum(), seq.sum()),
      "seq-mean-token-sum-norm": (-(adv * n).sum(), seq.sum() * L_MAX),
      "prompt-mean": (sum(s / c for s, c in by_group if c), sum(c > 0 for _, c in by_group)),
  }
  assert expected.keys() == AGGREGATIONS.keys()
  for agg, (s, den) in expected.items():
    out, _ = run(_cfg("reinforce", aggregation=agg), d)
    assert float(out.loss_sum) == pytest.approx(float(s), rel=1e-6), agg
    assert float(out.denominator) == den, agg
    assert float(out.loss) == pytest.approx(float(s) / den, rel=1e-6), agg


# ------------------------------------------------------------------------- KL, entropy, metrics

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty(estimator, batch):
  cfg = _cfg("reinforce", kl_coef=0.5, kl_estimator=estimator)
  out, g = run(cfg, batch)
  base, g_base = run(_cfg("reinforce"), batch)
  mask = _np(batch["mask"])
  dlt = _np(batch["ref"]) - _np(batch["logps"])  # log(ref / pi)
  kl, dkl = {"k1": (-dlt, np.ones_like(dlt)), "k2": (0.5 * dlt**2, -dlt),
             "k3": (np.exp(dlt) - dlt - 1, 1 - np.exp(dlt))}[estimator]
  assert float(out.metrics["kl_ref"]) == pytest.approx((kl * mask).sum() / mask.sum(), rel=1e-5)
  assert float(out.loss) == pytest.approx(
      float(base.loss) + 0.5 * (kl * mask).sum() / mask.sum(), rel=1e-5)
  np.testing.assert_allclose(_np(g), _np(g_base) + 0.5 * dkl * mask / mask.sum(), rtol=1e-5,
                             atol=1e-7)


def test_entropy_bonus(batch):
  out, _ = run(_cfg("cispo", entropy_coef=0.1), batch)
  base, _ = run(_cfg("cispo"), batch)
  mask = _np(batch["mask"])
  ent_mean = (_np(batch["ent"]) * mask).sum() / mask.sum()
  assert float(out.metrics["entropy"]) == pytest.approx(ent_mean, rel=1e-6)
  assert float(out.loss) == pytest.approx(float(base.loss) - 0.1 * ent_mean, rel=1e-5)
  assert float(out.metrics["pg_loss"]) == pytest.approx(float(base.loss), rel=1e-6)


def test_metrics_on_a_hand_example():
  ratio = np.array([[2.0, 0.5, 7.0, 100.0]])
  d = dict(logps=jnp.asarray(np.log(ratio), jnp.float32), old=jnp.zeros((1, 4)),
           adv=jnp.array([[1.0, -1.0, 1.0, -1.0]]), mask=jnp.array([[1.0, 1.0, 1.0, 0.0]]))
  r = ratio[0, :3]
  m, _ = run(_cfg("cispo"), d)
  m = {k: float(v) for k, v in m.metrics.items()}
  assert m["weight_mean"] == pytest.approx((2 + 0.5 + 5) / 3)
  assert (m["clip_frac_high"], m["cap_frac_pos_adv"], m["cap_frac_neg_adv"]) == pytest.approx(
      (1 / 3, 1 / 3, 0.0))
  assert m["clip_frac_low"] == 0.0 and m["num_tokens"] == 3 and m["num_seqs"] == 1
  assert (m["ratio_min"], m["ratio_max"], m["ratio_mean"]) == pytest.approx((0.5, 7.0, r.mean()))
  assert m["approx_kl"] == pytest.approx((r - 1 - np.log(r)).mean(), rel=1e-6)
  g, _ = run(_cfg("grpo"), d)
  g = {k: float(v) for k, v in g.metrics.items()}
  assert (g["clip_frac_low"], g["clip_frac_high"], g["clip_frac_region"]) == pytest.approx(
      (1 / 3, 2 / 3, 1.0))
  assert g["weight_mean"] == pytest.approx((1.2 + 0.8 + 1.2) / 3)


# ------------------------------------------------------------------- numerics and transforms

def test_low_precision_inputs_compute_in_f32(batch):
  cfg = _cfg("cispo", kl_coef=0.1)
  lowp = {k: (v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v) for k, v in batch.items()}
  out_bf, g_bf = _runner(cfg)(lowp)
  out_f32, _ = run(cfg, {k: (v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v)
                         for k, v in lowp.items()})
  assert out_bf.loss.dtype == jnp.float32 and g_bf.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in out_bf.metrics.values())
  assert float(out_bf.loss) == float(out_f32.loss)


@pytest.mark.parametrize("loss_type,aggregation", [("cispo", "prompt-mean"), ("gspo", None)])
def test_jit_matches_eager(loss_type, aggregation, batch):
  cfg = _cfg(loss_type, aggregation=aggregation, kl_coef=0.1)
  out, g = run(cfg, batch)
  out_j, g_j = jax.jit(_runner(cfg))(batch)
  assert float(out_j.loss) == pytest.approx(float(out.loss), rel=1e-6)
  np.testing.assert_allclose(_np(g_j) / float(out_j.denominator), _np(g), rtol=1e-6, atol=1e-8)
  assert out_j.metrics.keys() == out.metrics.keys()


def test_extreme_log_ratios_stay_finite():
  d = _one_token(1e4, 1.0, logp=-1e3)
  for lt in sorted(LOSS_TYPES):
    out, g = run(_cfg(lt), d)
    assert np.isfinite(float(out.loss)) and np.isfinite(_np(g)).all(), lt


@pytest.mark.parametrize("aggregation", ["prompt-mean", "token-mean"])
def test_vmap_matches_per_batch_calls(aggregation):
  cfg = _cfg("cispo", aggregation=aggregation, kl_coef=0.1)
  d0, d1 = _batch(seed=4), _batch(seed=5)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), d0, d1)
  f = lambda d: policy_loss(d["logps"], d["old"], d["adv"], d["mask"], cfg,
                            ref_logps_BxT=d["ref"], group_ids_B=d["gids"]).loss
  vm = jax.jit(jax.vmap(f))(stacked)
  direct = jax.jit(policy_loss, static_argnames="cfg")(
      d1["logps"], d1["old"], d1["adv"], d1["mask"], cfg=cfg, ref_logps_BxT=d1["ref"],
      group_ids_B=d1["gids"]).loss
  np.testing.assert_allclose(_np(vm), [float(run(cfg, d0)[0].loss), float(direct)], rtol=1e-6)


def test_token_logps_and_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (2, 3, 11))
  tokens = rng.integers(0, 11, (2, 3))
  for temp in (1.0, 0.7):
    logps, ent = logprobs.token_logps_and_entropy(jnp.asarray(logits, jnp.bfloat16), tokens, temp)
    assert logps.dtype == jnp.float32 and ent.dtype == jnp.float32
    z = _np(jnp.asarray(logits, jnp.bfloat16)) / temp
    logp_all = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - z.max(-1, keepdims=True)
    np.testing.assert_allclose(_np(logps), np.take_along_axis(logp_all, tokens[..., None], -1)[
        ..., 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(ent), -(np.exp(logp_all) * logp_all).sum(-1), rtol=1e-5)
  with pytest.raises(ValueError, match="temperature"):
    logprobs.token_logps_and_entropy(jnp.asarray(logits), tokens, 0.0)


def test_a_new_loss_is_one_registered_function(batch):
  @losses.register_loss("half_reinforce", aggregation="token-mean")
  def _half(x, cfg):
    return -0.5 * x.adv * x.logps, losses.no_clip_stats(jnp.full_like(x.logps, 0.5))
  try:
    _, g = run(_cfg("half_reinforce"), batch)
    _, g_full = run(_cfg("reinforce"), batch)
    np.testing.assert_allclose(_np(g), 0.5 * _np(g_full), rtol=1e-6)
  finally:
    del LOSS_TYPES["half_reinforce"]
