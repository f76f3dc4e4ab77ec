"""What a compiled program communicates: its collectives, read from the optimized HLO text.

    for c in collectives(jax.jit(f).lower(*args).compile()):
      print(c.op, c.shape, c.nbytes, c.in_loop)

`in_loop` says whether the collective runs inside a while loop's body (a decode loop, a scan over
layers), i.e. once per iteration rather than once per call. Used by the decode-layout check
(tests/test_decode_layout.py) and the rollout benchmark; a reader of the HLO, not a rewriter.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_CALLED = re.compile(r"(?:body|condition|to_apply|calls|branch_computations|true_computation|false_computation)="
                     r"\{?([%\w.\-, ]+)\}?")


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str  # all-gather, all-reduce, ... (the async -start form is reported under its plain name)
  shape: tuple  # the result's dims (the first array of a tuple result)
  dtype: str
  nbytes: int  # bytes of the result's arrays
  in_loop: bool  # inside some while loop's body (directly or through the computations it calls)
  computation: str


def _computations(text: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif name is not None:
      if line.strip() == "}":
        name = None
      else:
        comps[name].append(line)
  return comps


def _called(line: str) -> list[str]:
  out = []
  for group in _CALLED.findall(line):
    out += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
  return out


def collectives(compiled_or_text) -> list[Collective]:
  """Every collective of a compiled program (a jax Compiled, or its `as_text()`)."""
  text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
  comps = _computations(text)
  in_loop: set[str] = set()
  frontier = []
  for lines in comps.values():
    for line in lines:
      if " while(" in line:
        frontier += [c for c in re.findall(r"body=%?([\w.\-]+)", line)]
  while frontier:  # everything a loop body calls runs per iteration too
    c = frontier.pop()
    if c in in_loop or c not in comps:
      continue
    in_loop.add(c)
    for line in comps[c]:
      frontier += _called(line)
  out = []
  for name, lines in comps.items():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      op = m.group(2).removesuffix("-start")
      if op not in COLLECTIVES:
        continue
      arrays = _ARRAY.findall(m.group(1))
      if op == "all-gather" and m.group(2).endswith("-start") and len(arrays) > 1:
        arrays = arrays[len(arrays) // 2:]  # ((operands), (results)): the results
      dims = [tuple(int(d) for d in a[1].split(",") if d) for a in arrays]
      nbytes = sum(_BYTES.get(a[0], 4) * math.prod(d) for a, d in zip(arrays, dims))
      out.append(Collective(op, dims[0] if dims else (), arrays[0][0] if arrays else "", nbytes,
                            name in in_loop, name))
  return out


def _squeeze(shape) -> tuple:
  return tuple(d for d in shape if d != 1)


def weight_block_shapes(logical_tree, shapes_tree, sizes, rules_list) -> set[tuple]:
  """Every shape a weight matrix takes whole or as a block of one of `rules_list`'s layouts, per layer or
  stacked (size-1 dims dropped; 1-D weights, norms and biases, left out): an all-gather whose result has
  one of these shapes is gathering a weight."""
  from cispo_jax.sharding.mesh import _is_spec, resolve_spec, shard_shape
  import jax
  import numpy as np

  out: set[tuple] = set()

  def add(lg, x):
    shape = tuple(np.shape(x))
    if len(shape) < 2:
      return
    for rules in rules_list:
      for s in (shape, shard_shape(shape, resolve_spec(lg, shape, sizes, rules), sizes)):
        for t in (s, s[1:] if tuple(lg)[:1] == ("layers",) else s):
          if len(_squeeze(t)) >= 2:
            out.add(_squeeze(t))

  jax.tree.map(add, logical_tree, shapes_tree, is_leaf=_is_spec)
  return out


def weight_gathers(compiled_or_text, block_shapes: set[tuple]) -> list[Collective]:
  """The all-gathers of a program whose results are weights or weight blocks (weight_block_shapes)."""
  return [c for c in collectives(compiled_or_text) if c.op == "all-gather" and _squeeze(c.shape) in block_shapes]
