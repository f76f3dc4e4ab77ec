"""RolloutConfig: how the rollout samples (the group, temperature, filters, prompt buckets) and, pipelined,
by which policy version on which devices; `sampling_config` turns it into the sampler's static config."""

from __future__ import annotations

import dataclasses

from cispo_jax.config.fields import at_least
from cispo_jax.rollout.sampling import SamplingConfig
from cispo_jax.rollout.stops import Stops, resolve_stops

BEHAVIOUR_LOGPS = ("recompute", "sampler")
ENGINES = ("static", "paged")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Sampling the rollout: the group of completions per prompt, how they are sampled, and (pipelined) by
  which policy version on which devices. Names follow TRL where they exist (num_generations)."""
  # Completions per prompt (the group). Here, not in UpdateConfig: it is what the sampler draws; the
  # advantages and the update take the group size of the rollout they get.
  num_generations: int = 8
  max_new_tokens: int = 24
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  apply_chat_template: bool = False
  # Stops beside the checkpoint's own (the tokenizer's eos, generation_config.json's eos ids, the chat
  # template's end of turn; stops.py): more token ids, and strings (one token: its id; longer: its tokens).
  stop_token_ids: tuple = ()
  stop_strings: tuple = ()
  # "static": one batch per call, the cache sized to the budget (sampling.py). "paged": continuous batching
  # over a paged KV pool (paged/): paged_slots rows at once, pages of paged_page_size positions, a pool of
  # paged_num_pages pages (0 = every slot at the full budget), paged_steps_per_sync decode steps per host check,
  # prompts longer than paged_prefill_chunk prefilled a chunk of that many positions between two bursts.
  engine: str = "static"
  paged_slots: int = 64
  paged_page_size: int = 16
  paged_num_pages: int = 0
  paged_steps_per_sync: int = 8
  paged_prefill_chunk: int = 512
  # ScaleRL's forced length interruption (paged engine): a completion that has not produced think_end_text
  # within think_budget tokens gets interrupt_text appended (in its context, not in the loss), then goes on to
  # max_new_tokens to answer. 0 = off.
  think_budget: int = 0
  interrupt_text: str = "\n\nOkay, time is up. Let me stop thinking and formulate a final answer now.\n</think>\n\n"
  think_end_text: str = "</think>"
  prompt_buckets: tuple = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # padded prompt lengths (one program each)
  # Pipelined off-policy RL (pipeline.py). The rollout of iteration i is sampled by the policy of iteration
  # max(0, i - max_staleness) while the updates in between run; 0 = the synchronous loop (sample, then update).
  max_staleness: int = 0
  # > 0: the first rollout_devices devices sample (a rollout sub-mesh) and the rest train (the run's
  # MeshConfig applies to those); weights are copied over after each update (or each weight_sync_every-th).
  # 0 = colocated. Every engine samples in the decode layout (sharding.DECODE_RULES): weights split over the
  # mesh's `tensor` axis only, requests over the others; rollout_tensor is the sub-mesh's tensor size.
  rollout_devices: int = 0
  rollout_tensor: int = 1
  # The old log-probs of a stale rollout (the behaviour policy's): "recompute" = a training forward at the
  # version that sampled it, on the rollout devices; "sampler" = the sampler's own log-probs.
  behaviour_logps: str = "recompute"
  # Pipelined: the rollout engine gets the trainer's weights after every k-th update only (k = 1: after each).
  # Rollout i is then sampled by version max(0, k * floor((i - max_staleness) / k)): staleness s .. s + k - 1,
  # and 1/k of the weight transfers (a cross-mesh or cross-host copy of the whole model each).
  weight_sync_every: int = 1

  def __post_init__(self):
    at_least(self, ("num_generations", "max_new_tokens", "weight_sync_every", "rollout_tensor"), 1)
    if not self.temperature > 0:
      raise ValueError(f"RolloutConfig.temperature={self.temperature}; must be > 0")
    at_least(self, ("max_staleness", "rollout_devices"), 0)
    if self.engine not in ENGINES:
      raise ValueError(f"RolloutConfig.engine={self.engine!r}; allowed: {list(ENGINES)}")
    at_least(self, ("paged_slots", "paged_page_size", "paged_steps_per_sync", "paged_prefill_chunk"), 1)
    at_least(self, ("paged_num_pages", "think_budget"), 0)
    if self.think_budget and self.engine != "paged":
      raise ValueError(f"RolloutConfig.think_budget={self.think_budget} (forced interruption) needs "
                       f"RolloutConfig.engine='paged', not {self.engine!r}")
    if self.think_budget and not (self.interrupt_text and self.think_end_text):
      raise ValueError("RolloutConfig.think_budget > 0 needs a non-empty interrupt_text and think_end_text")
    if self.behaviour_logps not in BEHAVIOUR_LOGPS:
      raise ValueError(f"RolloutConfig.behaviour_logps={self.behaviour_logps!r}; allowed: {list(BEHAVIOUR_LOGPS)}")
    if self.weight_sync_every > 1 and not self.pipelined:
      raise ValueError(f"RolloutConfig.weight_sync_every={self.weight_sync_every} needs a pipelined run "
                       "(RolloutConfig.max_staleness > 0 or RolloutConfig.rollout_devices > 0): the synchronous "
                       "loop samples with the trainer's own weights")

  @property
  def pipelined(self) -> bool:
    """Rollouts come from a producer thread (pipeline.py) rather than in line."""
    return self.max_staleness > 0 or self.rollout_devices > 0

  @property
  def stale(self) -> bool:
    """Whether a rollout can be sampled by an older policy version than the one that trains on it."""
    return self.max_staleness > 0 or self.weight_sync_every > 1


def paged_config(ro: RolloutConfig):
  """The paged engine's config, or None for the static sampler."""
  if ro.engine != "paged":
    return None
  from cispo_jax.rollout.paged import PagedConfig
  return PagedConfig(num_slots=ro.paged_slots, page_size=ro.paged_page_size, num_pages=ro.paged_num_pages,
                     steps_per_sync=ro.paged_steps_per_sync, prefill_chunk=ro.paged_prefill_chunk)


def run_stops(ro: RolloutConfig, tokenizer, model_dir: str | None, vocab_size: int) -> Stops:
  """The run's stop set: the checkpoint's stop tokens and RolloutConfig's (stops.py)."""
  return resolve_stops(tokenizer, model_dir, vocab_size, stop_token_ids=ro.stop_token_ids,
                       stop_strings=ro.stop_strings)


def _interruption(ro: RolloutConfig, tokenizer) -> dict:
  """The forced interruption's token ids (none when it is off)."""
  if not ro.think_budget:
    return {}
  ids = {name: tuple(tokenizer.encode(getattr(ro, name), add_special_tokens=False))
         for name in ("interrupt_text", "think_end_text")}
  for name, toks in ids.items():
    if not toks:
      raise ValueError(f"RolloutConfig.{name}={getattr(ro, name)!r} encodes to no tokens with this tokenizer")
  if ro.think_budget + len(ids["interrupt_text"]) >= ro.max_new_tokens:
    raise ValueError(f"RolloutConfig.think_budget={ro.think_budget} plus the {len(ids['interrupt_text'])} tokens of "
                     f"RolloutConfig.interrupt_text leave no room to answer within "
                     f"RolloutConfig.max_new_tokens={ro.max_new_tokens}")
  return {"think_budget": ro.think_budget, "interrupt_tokens": ids["interrupt_text"],
          "think_end_tokens": ids["think_end_text"]}


def sampling_config(ro: RolloutConfig, tokenizer, stops: Stops, *, greedy: bool, n: int) -> SamplingConfig:
  """The sampler's config for rollouts (greedy=False, n=num_generations) or greedy eval (greedy=True, n=1)."""
  return SamplingConfig(**_interruption(ro, tokenizer),
      max_new_tokens=ro.max_new_tokens, temperature=1.0 if greedy else ro.temperature, greedy=greedy,
      top_k=0 if greedy else ro.top_k, top_p=1.0 if greedy else ro.top_p,
      min_p=0.0 if greedy else ro.min_p, stop_token_ids=stops.token_ids, stop_sequences=stops.sequences, num_samples=n,
      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
      prompt_buckets=tuple(ro.prompt_buckets))
