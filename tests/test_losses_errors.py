"""Policy-loss core, bad input: each wrong config or shape names the field and the allowed values."""

import jax.numpy as jnp
import pytest

from cispo_jax.rl.losses import LossConfig, policy_loss
from test_losses import B, T, _batch


@pytest.fixture(scope="module")
def batch():
  return _batch()


@pytest.mark.parametrize("kw,fragments", [
    (dict(loss_type="cispoo"), ["loss_type", "'cispo'", "'grpo'", "'sapo'"]),
    (dict(aggregation="mean"), ["aggregation", "'token-mean'", "'prompt-mean'"]),
    (dict(loss_type="grpo", epsilon_low=0.0), ["epsilon_low", "> 0"]),
    (dict(loss_type="dapo", epsilon_high=-0.1), ["epsilon_high", "> 0"]),
    (dict(loss_type="cispo", epsilon_high=0.2), ["epsilon_high", "cap", "absolute", ">= 1",
                                                 "cispo_mode='relative'"]),
    (dict(loss_type="cispo", epsilon_low=-1.0), ["epsilon_low", "> 0"]),
    (dict(cispo_mode="abs"), ["cispo_mode", "'absolute'", "'relative'"]),
    (dict(kl_estimator="k4"), ["kl_estimator", "'k1'", "'k3'"]),
    (dict(loss_type="dr_grpo"), ["max_completion_length", "seq-mean-token-sum-norm"]),
    (dict(loss_type="ppo", dual_clip=0.5), ["dual_clip", "> 1"]),
    (dict(loss_type="cispo", dual_clip=3.0), ["dual_clip", "'grpo'", "'ppo'"]),
    (dict(loss_type="grpo", cispo_token_mask=True), ["cispo_token_mask", "cispo"]),
    (dict(loss_type="sapo", epsilon_high=0.2), ["epsilon_high", "sapo", "'cispo'"]),
    (dict(sapo_tau_neg=0.0), ["sapo_tau_neg", "> 0"]),
])
def test_bad_config_names_field_and_allowed_values(kw, fragments):
  with pytest.raises(ValueError) as e:
    LossConfig(**kw).resolved()
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))


def test_relative_cispo_accepts_small_epsilons_and_resolves_defaults():
  assert LossConfig(cispo_mode="relative", epsilon_high=0.2).resolved().epsilon_high == 0.2
  r = LossConfig().resolved()
  assert (r.aggregation, r.epsilon_low, r.epsilon_high) == ("token-mean", 1.0, 5.0)
  assert LossConfig(cispo_mode="relative").resolved().epsilon_high == 4.0
  d = LossConfig("dapo").resolved()
  assert (d.aggregation, d.epsilon_low, d.epsilon_high) == ("token-mean", 0.2, 0.28)
  assert LossConfig("grpo").resolved().aggregation == "seq-mean-token-mean"
  assert LossConfig("gspo").resolved().epsilon_high == 4e-4
  assert r.resolved() == r


@pytest.mark.parametrize("change,fragments", [
    (dict(logps=jnp.zeros((B, T + 1))), ["logps_BxT", f"({B}, {T + 1})", f"({B}, {T})"]),
    (dict(old=jnp.zeros((B - 1, T))), ["old_logps_BxT", f"({B}, {T})"]),
    (dict(adv=jnp.zeros((B, 2))), ["advantages", f"({B},)", f"({B}, {T})"]),
    (dict(ref=jnp.zeros((B,))), ["ref_logps_BxT"]),
    (dict(gids=jnp.zeros((B, 1), jnp.int32)), ["group_ids_B", f"({B},)"]),
])
def test_mismatched_shapes_raise(change, fragments, batch):
  d = dict(batch, **change)
  with pytest.raises(ValueError) as e:
    policy_loss(d["logps"], d["old"], d["adv"], d["mask"], LossConfig(), ref_logps_BxT=d["ref"],
                group_ids_B=d["gids"])
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))


@pytest.mark.parametrize("cfg,kw,fragment", [
    (LossConfig(aggregation="prompt-mean"), dict(group_ids_B=None), "group_ids_B"),
    (LossConfig(kl_coef=0.1), dict(ref_logps_BxT=None), "ref_logps_BxT"),
    (LossConfig(entropy_coef=0.1), dict(entropy_BxT=None), "entropy_BxT"),
    (LossConfig("dr_grpo", max_completion_length=T - 1), {}, "max_completion_length"),
])
def test_missing_inputs_raise(cfg, kw, fragment, batch):
  with pytest.raises(ValueError, match=fragment):
    policy_loss(batch["logps"], batch["old"], batch["adv"], batch["mask"], cfg, **kw)
