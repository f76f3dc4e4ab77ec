"""The page pool's bookkeeping, on the host: which pages are free, and who holds each one.

A page is `page_size` consecutive positions of one sequence's keys and values, in every layer. A slot's
page table lists its pages in position order. The n samples of a prompt share the pages that hold only
prompt positions (a page is freed when its last holder lets go); the page where a sample's own tokens
begin is copied for each sample. Page 0 is never handed out: the device programs write the positions of
idle slots and of padding there, so it holds garbage and no table points at it.
"""

from __future__ import annotations

import dataclasses


class PoolExhausted(Exception):
  """Not enough free pages for a request (the scheduler waits or preempts; never raised to the user)."""


@dataclasses.dataclass
class PageStats:
  allocated: int = 0  # pages handed out, in all
  freed: int = 0
  peak_used: int = 0
  preemptions: int = 0


class PagePool:
  """Free list and reference counts of `num_pages` pages (page 0 is the scratch page)."""

  SCRATCH = 0

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f"PagedConfig.num_pages={num_pages}; needs >= 2 (page 0 is scratch)")
    self.num_pages, self.page_size = num_pages, page_size
    self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out the lowest first
    self._refs = [0] * num_pages
    self.stats = PageStats()

  @property
  def free(self) -> int:
    return len(self._free)

  @property
  def used(self) -> int:
    return self.num_pages - 1 - len(self._free)

  def pages_for(self, positions: int) -> int:
    return -(-positions // self.page_size)

  def alloc(self, n: int) -> list[int]:
    if n > len(self._free):
      raise PoolExhausted(f"{n} pages asked, {len(self._free)} free")
    pages = [self._free.pop() for _ in range(n)]
    for p in pages:
      self._refs[p] = 1
    self.stats.allocated += n
    self.stats.peak_used = max(self.stats.peak_used, self.used)
    return pages

  def share(self, pages) -> None:
    """One more holder of each page (a sample reading its prompt's pages)."""
    for p in pages:
      assert self._refs[p] > 0, f"page {p} shared while free"
      self._refs[p] += 1

  def release(self, pages) -> None:
    """One holder fewer of each page; a page nobody holds goes back to the free list."""
    for p in pages:
      assert self._refs[p] > 0, f"page {p} released while free"
      self._refs[p] -= 1
      if self._refs[p] == 0:
        self._free.append(p)
        self.stats.freed += 1

  def all_free(self) -> bool:
    return len(self._free) == self.num_pages - 1 and not any(self._refs)
