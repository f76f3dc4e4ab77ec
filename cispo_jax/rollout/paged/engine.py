"""Continuous batching over the page pool: the host scheduler.

A fixed number of decode slots. Between bursts of `steps_per_sync` decode steps on the device, the host
(1) gives every free slot the next pending (prompt, sample) whose pages fit, prefilling a prompt the
first time one of its samples starts (a prompt longer than `prefill_chunk` positions a chunk per burst,
its rows waiting in their slots, so the running rows never wait for a whole long prefill); (2) gives
every running row the pages its next burst writes, preempting the newest row when the pool is full (its
pages are freed and it starts over later; its tokens come out the same, as each row's randomness is
keyed by (rollout key, prompt, sample, position)); (3) runs the burst on the running rows packed into
one of a few batch sizes, and collects each row's tokens, freeing the pages of rows that ended. A request
that could never fit (prompt + budget larger than the pool) is refused before anything runs. ScaleRL's
forced interruption (SamplingConfig.think_budget) runs inside the burst (step.py), so it too is the same
in any schedule.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cispo_jax import sharding
from cispo_jax.model import ModelConfig
from cispo_jax.rollout import sampling
from cispo_jax.rollout.paged import step as dev
from cispo_jax.rollout.paged.pool import PagePool, PoolExhausted


@dataclasses.dataclass(frozen=True)
class PagedConfig:
  num_slots: int = 64  # rows decoded at once
  page_size: int = 16  # positions a page holds
  num_pages: int = 0  # the pool, page 0 included; 0 = every slot at the longest prompt + full budget
  steps_per_sync: int = 8  # decode steps on the device between two host checks
  # the decode batch is the running rows packed into the next of these sizes per octave of slots (one
  # program each): more sizes waste fewer row-steps as the queue drains, and compile more programs
  slot_sizes_per_octave: int = 4
  # a prompt of more positions than this is prefilled in chunks of this many, one chunk between two decode
  # bursts, so the running rows never wait for a whole long prefill
  prefill_chunk: int = 512
  # decode attention reads a slot's pages this many positions at a time (online softmax) once the longest
  # live row is longer, so its temp memory is one block a slot, not the longest row
  attention_block: int = 2048

  def __post_init__(self):
    for name in ("num_slots", "page_size", "steps_per_sync", "slot_sizes_per_octave", "prefill_chunk",
                 "attention_block"):
      if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
        raise ValueError(f"PagedConfig.{name}={getattr(self, name)!r}; must be an int >= 1")
    if self.num_pages < 0:
      raise ValueError(f"PagedConfig.num_pages={self.num_pages}; must be >= 0 (0 = sized for the budget)")


@dataclasses.dataclass(eq=False)
class _Row:
  r: int  # output row: prompt * n + sample
  prompt: int
  budget: int
  age: int = 0  # when it was last admitted (the newest is preempted first)
  table: list = dataclasses.field(default_factory=list)  # the row's page table
  own: list = dataclasses.field(default_factory=list)  # its own pages (the rest are its prompt's)
  tokens: list = dataclasses.field(default_factory=list)
  logps: list = dataclasses.field(default_factory=list)
  forced: list = dataclasses.field(default_factory=list)  # per token: appended by a forced interruption
  stopped: bool = False
  fpos: int = -1  # forced interruption: -1 not interrupted, else the next interrupt token's index
  closed: bool = False  # the row has ended its thinking (think_end_tokens)


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def slot_size(n: int, num_slots: int, per_octave: int) -> int:
  """The decode batch for n running rows: the smallest of `per_octave` evenly spaced sizes in n's octave
  (for 64 slots and 4: ... 16, 20, 24, 28, 32, 40, 48, 56, 64) that holds n; at most num_slots."""
  lo = _bucket(n) // 2
  step = max(1, lo // per_octave)
  return min(num_slots, max(1, -(-n // step) * step))


def row_keys(key, n_prompts: int, n: int) -> np.ndarray:
  """Key data of every row: fold_in(fold_in(key, prompt), sample)."""
  key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
  p, s = np.divmod(np.arange(n_prompts * n), n)
  keys = jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(key, a), b))(p, s)
  return np.asarray(jax.random.key_data(keys))


class PagedGenerator:
  """One call of `generate_paged`: the pool, the slots and the queue of rows."""

  def __init__(self, params, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], key, cfg, paged, budgets):
    self.params, self.cfg, self.scfg, self.paged = params, model_cfg, cfg, paged
    self.prompts = [list(map(int, p)) for p in prompts]
    n = cfg.num_samples
    self.budgets = [cfg.max_new_tokens] * len(self.prompts) if budgets is None else [int(b) for b in budgets]
    self._check_requests()
    ps = paged.page_size
    need = max(-(-(len(p) + b) // ps) + 1 for p, b in zip(self.prompts, self.budgets))
    # default: every slot at its full budget, beside the pages of its prompt (one prompt a slot at most)
    num_pages = paged.num_pages or 1 + paged.num_slots * (need + max(-(-len(p) // ps) for p in self.prompts))
    if num_pages - 1 < need:
      raise ValueError(f"PagedConfig.num_pages={num_pages} cannot hold one request: the longest prompt plus its "
                       f"budget (SamplingConfig.max_new_tokens) needs {need} pages of PagedConfig.page_size={ps} "
                       f"(and page 0 is scratch); raise num_pages or lower max_new_tokens")
    self.pool = PagePool(num_pages, ps)
    self.kv = dev.init_pool(model_cfg, num_pages, ps)
    self.keys = row_keys(key, len(self.prompts), n)
    self.rows = [_Row(p * n + s, p, self.budgets[p]) for p in range(len(self.prompts)) for s in range(n)]
    # prompts with a running sample -> [their pages, running samples]; a prompt whose samples all
    # ended or were preempted lets its pages go (it is prefilled again if a sample starts later)
    self.prompt_pages: dict[int, list] = {}
    # prompts being prefilled a chunk at a time -> the next position to prefill; their rows hold slots but
    # wait, and the copies of their tail pages wait in `deferred` until the last chunk is in
    self.chunking: dict[int, int] = {}
    self.deferred: dict[int, list] = {}
    self._clock = 0
    self.slots: list[_Row | None] = [None] * paged.num_slots
    # on a mesh, device batches are multiples of the batch axes' size (the slots split over them)
    mesh = jax.sharding.get_abstract_mesh()
    self.granule = 1 if mesh.empty else int(np.prod([mesh.shape.get(a, 1) for a in sharding.BATCH_AXES]))
    self.row_steps = self.useful_steps = self.chunk_calls = self.bursts = 0
    self.burst_shapes: set = set()  # (decode batch, pages a slot): one compiled program each

  def _check_requests(self):
    if not self.prompts or any(len(p) == 0 for p in self.prompts):
      raise ValueError("generate_paged: every prompt needs at least one token")
    if len(self.budgets) != len(self.prompts) or min(self.budgets) < 1:
      raise ValueError(f"generate_paged: budgets must be one int >= 1 per prompt, got {self.budgets}")
    ids = np.concatenate([np.asarray(p) for p in self.prompts])
    if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
      raise ValueError(f"a prompt holds token id {int(ids.max())}, outside vocab_size={self.cfg.vocab_size}")

  # --- admission, growth, preemption ---------------------------------------------------------------
  def _admit(self, pending: collections.deque) -> tuple[list[int], list[tuple[int, int]]]:
    """Rows into free slots while their pages fit. Returns (prompts to prefill, tail pages to copy)."""
    to_prefill, copies = [], []
    ps = self.pool.page_size
    for i, slot in enumerate(self.slots):
      if slot is not None or not pending:
        continue
      row = pending[0]
      p = len(self.prompts[row.prompt]) - 1  # prefilled positions 0 .. p-1; the row writes from p on
      fresh = row.prompt not in self.prompt_pages
      need = (self.pool.pages_for(p) if fresh else 0) + 1
      if need > self.pool.free:
        break  # the pool is full: wait for rows to end
      if fresh:
        self.prompt_pages[row.prompt] = [self.pool.alloc(self.pool.pages_for(p)), 0]
        if p > self.paged.prefill_chunk:
          self.chunking[row.prompt] = 0
        else:
          to_prefill.append(row.prompt)
      pages = self.prompt_pages[row.prompt][0]
      self.prompt_pages[row.prompt][1] += 1
      self._clock += 1
      row.age = self._clock
      shared = pages[:p // ps]
      self.pool.share(shared)
      row.own = self.pool.alloc(1)
      if p % ps:  # the page holding the prompt's last positions, where this row goes on writing
        pair = (pages[p // ps], row.own[0])
        (self.deferred.setdefault(row.prompt, []) if row.prompt in self.chunking else copies).append(pair)
      row.table, row.tokens, row.logps, row.forced, row.stopped = shared + row.own, [], [], [], False
      row.fpos, row.closed = -1, False
      self.slots[i] = pending.popleft()
    return to_prefill, copies

  def _grow(self, pending: collections.deque):
    """Pages for the positions every running row writes in the next burst; the newest row is preempted
    while the pool cannot give them."""
    k = self.paged.steps_per_sync
    for row in sorted((r for r in self.slots if r is not None), key=lambda r: r.age):
      if not any(s is row for s in self.slots):
        continue  # preempted for an older row
      last = len(self.prompts[row.prompt]) - 1 + min(len(row.tokens) + k, row.budget) - 1
      while len(row.table) < self.pool.pages_for(last + 1):
        try:
          page = self.pool.alloc(1)
        except PoolExhausted:
          victim = max((r for r in self.slots if r is not None), key=lambda r: r.age)
          self._free_row(victim)
          pending.appendleft(victim)
          self.pool.stats.preemptions += 1
          if victim is row:
            break
          continue
        row.own += page
        row.table += page

  def _free_row(self, row: _Row):
    """A row that ended or is preempted leaves its slot; its pages and its share of its prompt's go."""
    self.slots[next(i for i, s in enumerate(self.slots) if s is row)] = None
    if row.prompt in self.deferred:  # no copy into pages this row gives back
      self.deferred[row.prompt] = [c for c in self.deferred[row.prompt] if c[1] not in row.own]
    self.pool.release(row.own)
    self.pool.release(row.table[:len(row.table) - len(row.own)])
    row.own, row.table = [], []
    held = self.prompt_pages[row.prompt]
    held[1] -= 1
    if held[1] == 0:  # no sample of this prompt runs: the prompt's own pages go
      self.pool.release(self.prompt_pages.pop(row.prompt)[0])
      self.chunking.pop(row.prompt, None)
      self.deferred.pop(row.prompt, None)

  # --- device calls ---------------------------------------------------------------------------------
  def _prefill(self, prompts: list[int]):
    ps, P = self.pool.page_size, sampling.bucket_for(max(len(self.prompts[i]) for i in prompts), self.scfg)
    b = -(-_bucket(len(prompts)) // self.granule) * self.granule
    tokens = np.full((b, P), self.scfg.pad_token_id, np.int32)
    lengths = np.ones((b,), np.int32)  # padding rows: nothing prefilled
    page = np.zeros((b, P), np.int32)
    for j, i in enumerate(prompts):
      x = self.prompts[i]
      tokens[j, :len(x)], lengths[j] = x, len(x)
      pos = np.arange(len(x) - 1)
      page[j, pos] = np.asarray(self.prompt_pages[i][0])[pos // ps]
    offset = np.broadcast_to(np.arange(P) % ps, (b, P)).astype(np.int32)
    self.kv = dev.prefill(self.params, self.kv, tokens, lengths, page, offset, cfg=self.cfg)

  def _prefill_chunks(self) -> list[tuple[int, int]]:
    """The next chunk of every prompt being chunked, in one call. Returns the tail-page copies of the
    prompts whose last chunk this was (their rows start decoding)."""
    C = self.paged.prefill_chunk
    prompts = list(self.chunking)
    b = -(-_bucket(len(prompts)) // self.granule) * self.granule
    M = _bucket(max(len(self.prompt_pages[i][0]) for i in prompts))
    tokens, pos = np.zeros((b, C), np.int32), np.zeros((b, C), np.int32)
    valid, table = np.zeros((b, C), bool), np.zeros((b, M), np.int32)
    done = []
    for j, i in enumerate(prompts):
      x, start, pages = self.prompts[i], self.chunking[i], self.prompt_pages[i][0]
      n = min(C, len(x) - 1 - start)  # positions start .. start + n - 1 (the last token is decode's)
      tokens[j, :n], pos[j] = x[start:start + n], start + np.arange(C)
      valid[j, :n], table[j, :len(pages)] = True, pages
      self.chunking[i] = start + n
      if start + n == len(x) - 1:
        done.append(i)
    self.kv = dev.prefill_chunk(self.params, self.kv, tokens, pos, valid, table, cfg=self.cfg,
                                block=self.paged.attention_block)
    self.chunk_calls += 1
    copies = []
    for i in done:
      del self.chunking[i]
      copies += self.deferred.pop(i, [])
    return copies

  def _copy(self, copies):
    n = _bucket(len(copies))
    src, dst = np.zeros(n, np.int32), np.zeros(n, np.int32)
    src[:len(copies)], dst[:len(copies)] = zip(*copies)
    self.kv = dev.copy_pages(self.kv, src, dst)

  def _burst(self):
    # the running rows, packed into the smallest of a few batch sizes that holds them (one program per
    # size): as the queue drains, the tail's few long rows do not pay for the empty slots
    running = [row for row in self.slots if row is not None and row.prompt not in self.chunking]
    S = slot_size(len(running), len(self.slots), self.paged.slot_sizes_per_octave)
    S, k = max(S, -(-S // self.granule) * self.granule), self.paged.steps_per_sync
    M = _bucket(max(len(r.table) for r in running))
    self.burst_shapes.add((S, M))
    self.bursts += 1
    H = max([1, len(self.scfg.think_end_tokens)] + [len(s) for s in self.scfg.stop_sequences])
    st = {"token": np.zeros(S, np.int32), "pos": np.zeros(S, np.int32), "t": np.zeros(S, np.int32),
          "active": np.zeros(S, bool), "budget": np.ones(S, np.int32), "key": np.zeros((S,) + self.keys.shape[1:],
                                                                                    self.keys.dtype),
          "table": np.zeros((S, M), np.int32), "recent": np.full((S, H), -1, np.int32)}
    for i, row in enumerate(running):
      prompt = self.prompts[row.prompt]
      st["token"][i] = row.tokens[-1] if row.tokens else prompt[-1]
      st["pos"][i] = len(prompt) - 1 + len(row.tokens)
      st["t"][i], st["active"][i], st["budget"][i], st["key"][i] = len(row.tokens), True, row.budget, self.keys[row.r]
      st["table"][i, :len(row.table)] = row.table
      recent = row.tokens[-H:]
      st["recent"][i, H - len(recent):] = recent
    if self.scfg.think_budget:  # where each row is in a forced interruption
      st["fpos"] = np.array([r.fpos for r in running] + [-1] * (S - len(running)), np.int32)
      st["closed"] = np.array([r.closed for r in running] + [False] * (S - len(running)))
    self.kv, out, tok, logp, live, forced = dev.decode_burst(self.params, self.kv, st, cfg=self.cfg, scfg=self.scfg,
                                                             steps=k, block=self.paged.attention_block)
    tok, logp, live, forced, stopped = (np.asarray(x) for x in (tok, logp, live, forced, out["stopped"]))
    self.row_steps += S * k
    self.useful_steps += int(live.sum())
    for i, row in enumerate(running):
      row.tokens += tok[i][live[i]].tolist()
      row.logps += logp[i][live[i]].tolist()
      row.forced += forced[i][live[i]].tolist()
      if self.scfg.think_budget:
        row.fpos, row.closed = int(out["fpos"][i]), bool(out["closed"][i])
      if stopped[i] or len(row.tokens) >= row.budget:
        row.stopped = bool(stopped[i])
        self._free_row(row)

  def run(self, order=None) -> list[_Row]:
    order = range(len(self.rows)) if order is None else order
    pending = collections.deque(self.rows[r] for r in order)
    while pending or any(s is not None for s in self.slots):
      to_prefill, copies = self._admit(pending)
      if to_prefill:
        self._prefill(to_prefill)
      if self.chunking:  # a chunk of each long prompt, then a burst of the rows that are decoding
        copies += self._prefill_chunks()
      if copies:
        self._copy(copies)
      self._grow(pending)
      if any(s is not None and s.prompt not in self.chunking for s in self.slots):
        self._burst()
    return self.rows


def generate_paged(params, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], key, cfg: sampling.SamplingConfig,
                   paged: PagedConfig = PagedConfig(), *, budgets=None, order=None):
  """cfg.num_samples completions of each prompt (token id lists, no padding) through the paged engine.
  budgets: max new tokens per prompt (default cfg.max_new_tokens); order: the rows' arrival order.
  Returns (SampleOutput laid out as sampling.generate's, with N = the largest budget; stats)."""
  gen = PagedGenerator(params, model_cfg, prompts, key, cfg, paged, budgets)
  rows = gen.run(order)
  N = max(gen.budgets)
  B = len(rows)
  tokens = np.full((B, N), cfg.pad_token_id, np.int32)
  logps = np.zeros((B, N), np.float32)
  lengths = np.array([len(r.tokens) for r in rows], np.int32)
  forced = np.zeros((B, N), np.int32)
  for r in rows:
    tokens[r.r, :len(r.tokens)], logps[r.r, :len(r.tokens)] = r.tokens, r.logps
    forced[r.r, :len(r.tokens)] = r.forced
  width = max(len(p) for p in gen.prompts)
  ptok = np.full((len(gen.prompts), width), cfg.pad_token_id, np.int32)
  pmask = np.zeros_like(ptok)
  for i, p in enumerate(gen.prompts):
    ptok[i, width - len(p):], pmask[i, width - len(p):] = p, 1
  ptok, pmask = (np.repeat(x, cfg.num_samples, axis=0) for x in sampling.left_pad(ptok, pmask, cfg))
  out = sampling.SampleOutput(ptok, pmask, tokens, (np.arange(N)[None] < lengths[:, None]).astype(np.int32), logps,
                              lengths, np.array([r.stopped for r in rows]), forced if cfg.think_budget else None)
  stats = dict(dataclasses.asdict(gen.pool.stats), row_steps=gen.row_steps, useful_row_steps=gen.useful_steps,
               prefill_chunk_calls=gen.chunk_calls, bursts=gen.bursts,
               burst_shapes=len(gen.burst_shapes),
               num_pages=gen.pool.num_pages, pages_all_freed=gen.pool.all_free())
  return out, stats
