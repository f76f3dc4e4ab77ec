"""From per-token values to (loss_sum, denominator): the aggregation rules, and the per-token KL estimators.

The loss is loss_sum / denominator, divided once: micro-batches and data-parallel shards add sums and
denominators (prompt-mean: split along prompt groups), which reproduces the full batch exactly (losses.py
lists the rules). An aggregation takes (loss_BxT, mask_BxT, cfg: LossConfig, group_ids_B).
"""

from typing import Callable

import jax
import jax.numpy as jnp

AGGREGATIONS: dict[str, Callable] = {}


def register_aggregation(name):
  def deco(fn):
    AGGREGATIONS[name] = fn
    return fn
  return deco


def _seq_counts(mask_BxT):
  n_B = mask_BxT.sum(-1)
  return n_B, (n_B > 0).astype(jnp.float32)


@register_aggregation("token-mean")
def _token_mean(loss_BxT, mask_BxT, cfg, group_ids_B):
  return loss_BxT.sum(), mask_BxT.sum()


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(loss_BxT, mask_BxT, cfg, group_ids_B):
  n_B, has_B = _seq_counts(mask_BxT)
  return (loss_BxT.sum(-1) / jnp.maximum(n_B, 1.0)).sum(), has_B.sum()


@register_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(loss_BxT, mask_BxT, cfg, group_ids_B):
  return loss_BxT.sum(), _seq_counts(mask_BxT)[1].sum()


@register_aggregation("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss_BxT, mask_BxT, cfg, group_ids_B):
  return loss_BxT.sum(), _seq_counts(mask_BxT)[1].sum() * cfg.max_completion_length


@register_aggregation("prompt-mean")
def _prompt_mean(loss_BxT, mask_BxT, cfg, group_ids_B):
  B = loss_BxT.shape[0]
  # Dense ids in [0, B) whatever the caller's ids are (global prompt indices, hashes), so
  # segment_sum never drops a group; `size` keeps it static under jit.
  _, dense_B = jnp.unique(group_ids_B, return_inverse=True, size=B, fill_value=0)
  dense_B = dense_B.reshape(B)
  n_G = jax.ops.segment_sum(mask_BxT.sum(-1), dense_B, num_segments=B)
  sum_G = jax.ops.segment_sum(loss_BxT.sum(-1), dense_B, num_segments=B)
  return (sum_G / jnp.maximum(n_G, 1.0)).sum(), (n_G > 0).sum().astype(jnp.float32)


# KL of the current policy to the reference, per token

def _kl_k1(d):  # d = log(ref / pi), tokens sampled from pi
  return -d


def _kl_k2(d):
  return 0.5 * d * d


def _kl_k3(d):
  return jnp.exp(d) - d - 1.0


KL_ESTIMATORS = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}
