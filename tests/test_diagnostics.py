"""The fork-token diagnostic: per-token accounting on hand-made ratios, and agreement with jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax.rl import diagnostics
from cispo_jax.rl import losses
from cispo_jax.rl.losses import LossConfig, policy_loss

# Row 0 has A = +1, row 1 A = -1; the same six ratios in each, one per bucket edge case:
# 0.5 (lo), 1.0 (mid), 1.25 (hi, beyond GRPO's 1.2 but inside DAPO's 1.28), 1.3 (hi, beyond
# both), 7.0 (xhi, beyond CISPO's cap 5), and a padded position holding garbage.
RATIOS = np.array([0.5, 1.0, 1.25, 1.3, 7.0, 1.0])
MASK = np.array([[1, 1, 1, 1, 1, 0]] * 2, np.float32)
ADV = np.array([1.0, -1.0], np.float32)


def _hand_batch():
  old = np.full((2, 6), -2.0, np.float32)
  logps = old + np.log(RATIOS)[None].astype(np.float32)
  logps[:, -1] = np.nan  # a padded position: must influence nothing
  return jnp.asarray(logps), jnp.asarray(old)


def _weights(cfg):
  logps, old = _hand_batch()
  w = diagnostics.token_gradient_weights(logps, old, jnp.asarray(ADV), jnp.asarray(MASK), cfg)
  return {k: np.asarray(v) for k, v in w.items()}


def _zeroed(w):
  return (w["g0"] != 0) & (np.abs(w["g"]) <= diagnostics.ZERO_TOL * np.abs(w["g0"]))


@pytest.mark.parametrize("loss_type, hi", [("grpo", 1.2), ("dapo", 1.28)])
def test_ppo_clip_zeroes_exactly_the_binding_tokens(loss_type, hi):
  w = _weights(LossConfig(loss_type=loss_type))
  expect = np.zeros((2, 6), bool)
  expect[0, :5] = RATIOS[:5] > hi  # A > 0 above 1 + eps_high
  expect[1, :5] = RATIOS[:5] < 0.8  # A < 0 below 1 - eps_low
  np.testing.assert_array_equal(_zeroed(w), expect)
  np.testing.assert_allclose(w["kept"][MASK > 0], np.where(expect, 0.0, 1.0)[MASK > 0], atol=1e-6)
  # where it keeps the token, the gradient is the unclipped one: -r A
  np.testing.assert_allclose(w["g"], np.where(expect, 0.0, -RATIOS[None] * ADV[:, None]) * MASK, rtol=1e-5)


def test_cispo_zeroes_none_and_keeps_the_capped_weight():
  w = _weights(LossConfig(loss_type="cispo", epsilon_high=5.0))
  assert not _zeroed(w).any()
  kept = np.minimum(RATIOS, 5.0) / RATIOS
  np.testing.assert_allclose(w["kept"], np.where(MASK > 0, kept[None], 1.0), rtol=1e-5)
  np.testing.assert_allclose(w["g"], -np.minimum(RATIOS, 5.0)[None] * ADV[:, None] * MASK, rtol=1e-5)


def test_cispo_token_mask_zeroes_what_ppo_would_at_its_bounds():
  cfg = LossConfig(loss_type="cispo", cispo_mode="relative", cispo_token_mask=True, epsilon_low=0.2,
                   epsilon_high=0.28)
  w = _weights(cfg)
  np.testing.assert_array_equal(_zeroed(w), _zeroed(_weights(LossConfig(loss_type="dapo"))))
  # tokens kept: weight clip(r, 0.8, 1.28) / r (the in-band ones 1, the raised ones above 1)
  keep = ~_zeroed(w) & (MASK > 0)
  np.testing.assert_allclose(w["kept"][keep], (np.clip(RATIOS, 0.8, 1.28)[None] / RATIOS[None]
                                               * np.ones((2, 1)))[keep], rtol=1e-5)


def test_metrics_by_cell_on_the_hand_batch():
  logps, old = _hand_batch()
  args = (logps, old, jnp.asarray(ADV), jnp.asarray(MASK))
  grpo = diagnostics.accounting_metrics(*args, LossConfig(loss_type="grpo"))
  cispo = diagnostics.accounting_metrics(*args, LossConfig(loss_type="cispo"))
  n = 10.0  # valid tokens
  # Token shares: each row holds one lo, one mid (1.0), two hi (1.25, 1.3) and one xhi token.
  for m in (grpo, cispo):
    for s in diagnostics.SIGNS:
      assert float(m[f"diag/tok_{s}_lo"]) == pytest.approx(1 / n)
      assert float(m[f"diag/tok_{s}_hi"]) == pytest.approx(2 / n)
      assert float(m[f"diag/tok_{s}_xhi"]) == pytest.approx(1 / n)
  # GRPO zeroes pos hi (2), pos xhi (1), neg lo (1): 4 of 10 tokens.
  assert float(grpo["diag/zeroed"]) == pytest.approx(4 / n)
  assert float(grpo["diag/zeroed_pos_hi"]) == pytest.approx(2 / n)
  assert float(grpo["diag/zeroed_pos_xhi"]) == pytest.approx(1 / n)
  assert float(grpo["diag/zeroed_neg_lo"]) == pytest.approx(1 / n)
  assert float(grpo["diag/zeroed_neg_xhi"]) == 0.0
  assert float(cispo["diag/zeroed"]) == 0.0
  # Weights: seq-mean-token-mean (GRPO) and token-mean (CISPO) both weigh these tokens equally
  # (every row has 5 tokens), so removed = sum |g0| (1 - kept) / sum |g0| with |g0| = r.
  total = 2 * RATIOS[:5].sum()
  assert float(grpo["diag/removed_pos_xhi"]) == pytest.approx(7.0 / total, rel=1e-5)
  assert float(grpo["diag/removed"]) == pytest.approx((1.25 + 1.3 + 7.0 + 0.5) / total, rel=1e-5)
  assert float(cispo["diag/removed_pos_xhi"]) == pytest.approx((7.0 - 5.0) / total, rel=1e-5)
  assert float(cispo["diag/removed"]) == pytest.approx(2 * (7.0 - 5.0) / total, rel=1e-5)
  assert float(cispo["diag/removed_pos_hi"]) == 0.0


def _random_batch(seed=0):
  rng = np.random.default_rng(seed)
  B, T = 8, 6
  lengths = np.array([6, 3, 0, 1, 4, 6, 2, 5])
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  old = rng.uniform(-3.0, -0.1, (B, T))
  log_ratio = rng.normal(0.0, 0.8, (B, T))
  log_ratio[0, 0], log_ratio[1, 1], log_ratio[4, 2] = 2.2, -1.0, 1.9
  return dict(logps=jnp.asarray(old + log_ratio, jnp.float32), old=jnp.asarray(old, jnp.float32),
              adv=jnp.asarray(rng.normal(size=B), jnp.float32), mask=jnp.asarray(mask),
              gids=jnp.asarray([3, 3, 1, 1, 7, 7, 0, 0], jnp.int32))


def _cfg(loss_type, **kw):
  if loss_type == "dr_grpo":
    kw.setdefault("max_completion_length", 8)
  return LossConfig(loss_type=loss_type, **kw)


CONFIGS = [_cfg(t) for t in sorted(losses.LOSS_TYPES)] + [
    _cfg("cispo", cispo_token_mask=True), _cfg("cispo", cispo_mode="relative", epsilon_low=0.2),
    _cfg("grpo", dual_clip=3.0), _cfg("cispo", aggregation="prompt-mean"),
    _cfg("dapo", aggregation="seq-mean-token-sum")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_type}-{c.aggregation}-{c.cispo_token_mask}")
def test_accounting_matches_jax_grad_of_policy_loss(cfg):
  """a_t * g_t is exactly d loss_sum / d logp_t of the real policy_loss, for every loss."""
  d = _random_batch()
  grad = jax.grad(lambda lp: policy_loss(lp, d["old"], d["adv"], d["mask"], cfg,
                                         group_ids_B=d["gids"]).loss_sum)(d["logps"])
  w = diagnostics.token_gradient_weights(d["logps"], d["old"], d["adv"], d["mask"], cfg, d["gids"])
  np.testing.assert_allclose(np.asarray(w["agg"] * w["g"]), np.asarray(grad), rtol=1e-5, atol=1e-7)
  m = diagnostics.accounting_metrics(d["logps"], d["old"], d["adv"], d["mask"], cfg, d["gids"])
  # the cells partition the tokens with A != 0, and the removed shares add up to the total
  cells = [k for k in m if k.startswith("diag/removed_")]
  assert sum(float(m[k]) for k in cells) == pytest.approx(float(m["diag/removed"]), abs=1e-5)
  zeroed = sum(float(m[k]) for k in m if k.startswith("diag/zeroed_"))
  assert zeroed == pytest.approx(float(m["diag/zeroed"]), abs=1e-6)
  assert all(np.isfinite(float(v)) for v in m.values())


def test_beyond_the_log_ratio_clamp_matches_the_loss():
  """A log-ratio past LossConfig.log_ratio_clamp: the loss's gradient there is what the clamp
  leaves (0 through the ratio), and the accounting must say the same."""
  old = jnp.full((1, 3), -30.0)
  logps = jnp.asarray([[-1.0, -30.0, -29.0]])  # log r = 29 (clamped at 20), 0, 1
  adv, mask = jnp.asarray([-1.0]), jnp.ones((1, 3))  # A < 0: PPO's unclipped branch is active at r = e^29
  for t in ("grpo", "dapo", "cispo", "sapo"):
    cfg = _cfg(t)
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, cfg).loss_sum)(logps)
    w = diagnostics.token_gradient_weights(logps, old, adv, mask, cfg)
    np.testing.assert_allclose(np.asarray(w["agg"] * w["g"]), np.asarray(grad), rtol=1e-5, atol=1e-7)


def test_on_policy_nothing_is_removed():
  d = _random_batch()
  for t in ("grpo", "dapo", "cispo"):
    m = diagnostics.accounting_metrics(d["old"], d["old"], d["adv"], d["mask"], _cfg(t), d["gids"])
    assert float(m["diag/removed"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["diag/zeroed"]) == 0.0
