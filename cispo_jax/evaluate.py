"""`python -m cispo_jax.evaluate --model_dir DIR --data NAME=PATH [--data NAME=PATH ...]`

Greedy pass@1 and sampled pass@k (--num_samples n, --k 1,4,...), mean completion length and the
format-error rate of a model on named local datasets, with every completion written to
<out_dir>/outputs.jsonl and the numbers to <out_dir>/metrics.json. The column mapping, prompt
format, reward and sampling settings come from the same gin configs as training (--gin_file,
--gin_param, and the training shorthands such as --max_new_tokens, --temperature); without --data
it evaluates the configured TaskConfig.eval_sets, or else the task's held-out split. Multi-process
like training (--coordinator_address, --num_processes, --process_id): each process generates and
scores its share of every set on the mesh; process 0 writes metrics.json.

--model_dir may also be a PEFT LoRA adapter directory (adapter_config.json, as training's final_model/ with
LoraConfig.export 'peft'): the adapters run unmerged on their base, adapter_config.json's
base_model_name_or_path or --base_model, which must be the base they were trained on when the adapter
directory records its fingerprint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

log = logging.getLogger("cispo_jax.evaluate")
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "seed", "task")  # the training shorthands that matter here


def build_parser() -> argparse.ArgumentParser:
  from cispo_jax import cli

  p = argparse.ArgumentParser(prog="cispo_jax.evaluate", allow_abbrev=False,
                              description="Greedy pass@1, sampled pass@k, completion length and format errors of a "
                                          "model on named local datasets.")
  p.add_argument("--model_dir", required=True, help="local HF model directory (config.json, safetensors, tokenizer), "
                                                   "or a PEFT LoRA adapter directory (adapter_config.json)")
  p.add_argument("--base_model", default=None, help="with an adapter --model_dir: its base model directory (default: "
                                                    "adapter_config.json's base_model_name_or_path)")
  p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                 help="an eval set (repeatable): parquet, json/jsonl, csv, arrow or a save_to_disk dir ('dir::split')")
  p.add_argument("--out_dir", default="runs/eval", help="where outputs.jsonl and metrics.json go")
  p.add_argument("--num_samples", type=int, default=None, help="TaskConfig.eval_samples: samples per prompt")
  p.add_argument("--k", default=None, help="TaskConfig.eval_k, comma-separated, e.g. 1,4,8")
  p.add_argument("--batch_size", type=int, default=None, help="TaskConfig.eval_batch_size: prompts per call")
  p.add_argument("--reward", default=None, help="the pass reward (TaskConfig.rewards), e.g. math_answer")
  p.add_argument("--gin_file", action="append", default=None, help="gin file (repeatable); default: config/default.gin")
  p.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. TaskConfig.prompt_format='chat'")
  for flag in SAMPLING_FLAGS:
    p.add_argument(f"--{flag}", default=None, help=f"shorthand for {cli.SHORTHANDS[flag]}")
  return p


def _bindings(args) -> list[str]:
  """The CLI's own flags as gin bindings (they win over the gin files)."""
  out = [f"RLConfig.model_dir = {args.model_dir!r}"]
  if args.data:
    sets = {}
    for item in args.data:
      name, sep, path = item.partition("=")
      if not sep or not name or not path:
        raise ValueError(f"--data {item!r}: expected NAME=PATH")
      if name in sets:
        raise ValueError(f"--data names the set {name!r} twice")
      sets[name] = path
    out.append(f"TaskConfig.eval_sets = {sets!r}")
  if args.num_samples is not None:
    out.append(f"TaskConfig.eval_samples = {args.num_samples}")
  if args.k is not None:
    try:
      ks = tuple(int(k) for k in args.k.split(",") if k.strip())
    except ValueError:
      raise ValueError(f"--k {args.k!r}: expected comma-separated integers such as 1,4,8") from None
    out.append(f"TaskConfig.eval_k = {ks!r}")
  if args.batch_size is not None:
    out.append(f"TaskConfig.eval_batch_size = {args.batch_size}")
  if args.reward is not None:
    out.append(f"TaskConfig.rewards = (({args.reward!r}, 1.0),)")
  return out


class ModelSampler:
  """A model on a mesh, generating like the trainer's eval: the same rollout engine (rollout.NativeEngine),
  so evaluation runs exactly the training rollout's encode / shard / generate path."""

  def __init__(self, rl, mesh_cfg, devices=None, base_model: str | None = None):
    from cispo_jax import sharding
    from cispo_jax.model import hf_io, logical_axes, param_shapes
    from cispo_jax.rollout.config import paged_config
    from cispo_jax.rollout.engine import NativeEngine

    self.rl = rl
    self.mesh = sharding.make_mesh(mesh_cfg, devices)
    self.base_dir = rl.model_dir  # the model's own directory (config.json, generation_config.json)
    self.adapted = hf_io.is_peft_dir(rl.model_dir)  # a PEFT adapter directory on its base
    if self.adapted:
      self.base_dir, self.model_cfg, self.tokenizer, shardings, self.params = load_adapted(
          rl.model_dir, base_model, rl.model_run.overrides(), self.mesh)
    else:
      if base_model is not None:
        raise ValueError(f"--base_model {base_model!r} is for a PEFT adapter --model_dir, but {rl.model_dir} is "
                         "not one (it has no adapter_config.json)")
      self.model_cfg = hf_io.load_config(rl.model_dir, **rl.model_run.overrides())
      self.tokenizer = hf_io.load_tokenizer(rl.model_dir)
      # nothing trains here: the weights are read straight into the decode layout
      shardings = sharding.param_shardings(logical_axes(self.model_cfg), param_shapes(self.model_cfg), self.mesh,
                                           sharding.DECODE_RULES)
      self.params = hf_io.load_params(rl.model_dir, self.model_cfg, shardings=shardings)
    self.engine = NativeEngine(self.model_cfg, self.tokenizer, self.mesh, shardings,
                               apply_chat_template=rl.rollout.apply_chat_template, copy_weights=False,
                               paged=paged_config(rl.rollout))
    self.local_rows = self.engine.local_rows

  def generate(self, params, examples, key, cfg):
    return self.engine.generate(examples, key, cfg, params=params, host=True)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_adapted(adapter_dir: str, base_model: str | None, overrides: dict, mesh):
  """(base dir, model cfg, tokenizer, shardings, params) of a PEFT adapter directory on its base, in the decode
  layout: params = lora.combine(base, adapters) (run unmerged), cfg.lora_scaling the adapters' scaling. The
  tokenizer is the adapter directory's if it has one (training's export writes it), else the base's. A base
  whose weights fingerprint differs from the one the adapters recorded (they were trained on another) is
  refused, naming both."""
  from cispo_jax import sharding
  from cispo_jax.model import hf_io, logical_axes, lora, param_shapes
  from cispo_jax.model.hf_io.peft import ADAPTER_CONFIG

  lcfg, recorded, fingerprint = hf_io.read_peft_config(adapter_dir)
  base_dir = base_model or recorded
  if base_model is not None and not os.path.isdir(base_model):
    raise ValueError(f"--base_model {base_model!r} is not a directory")
  if not base_dir or not os.path.isdir(base_dir):
    raise ValueError(f"{os.path.join(adapter_dir, ADAPTER_CONFIG)}: base_model_name_or_path={recorded!r} is not a "
                     "local model directory; pass --base_model DIR (the base the adapters were trained on)")
  cfg = hf_io.load_config(base_dir, **overrides)
  lcfg.check_model(cfg)
  base_logical, base_shapes = logical_axes(cfg), param_shapes(cfg)
  base_shardings = sharding.param_shardings(base_logical, base_shapes, mesh, sharding.DECODE_RULES)
  adapter_shardings = sharding.param_shardings(lora.adapter_logical_axes(base_logical, lcfg),
                                               lora.adapter_shapes(base_shapes, lcfg), mesh, sharding.DECODE_RULES)
  base = hf_io.load_params(base_dir, cfg, shardings=base_shardings)
  if fingerprint is not None:
    actual = lora.fingerprint(base)
    if actual != fingerprint:
      raise ValueError(f"{adapter_dir}: the adapters were trained on the base {recorded} (weights fingerprint "
                       f"{fingerprint}), but the base given is {os.path.abspath(base_dir)} (fingerprint {actual}, "
                       f"loaded in {cfg.param_dtype}): adapters are only meaningful on their own base. Pass "
                       "--base_model with the original base (loaded in the training run's param_dtype)")
  adapters, lcfg, _, _ = hf_io.load_peft(adapter_dir, cfg, shardings=adapter_shardings)
  has_tokenizer = any(os.path.isfile(os.path.join(adapter_dir, f)) for f in _TOKENIZER_FILES)
  tokenizer = hf_io.load_tokenizer(adapter_dir if has_tokenizer else base_dir, vocab_size=cfg.vocab_size)
  log.info("LoRA adapters %s (rank %d, scaling %g, %s) on the base %s", adapter_dir, lcfg.rank, lcfg.scaling,
           ",".join(lcfg.targets), base_dir)
  return (base_dir, cfg.replace(lora_scaling=lcfg.scaling), tokenizer,
          lora.combine(base_shardings, adapter_shardings), lora.combine(base, adapters))


def evaluate(configs: dict[str, Any], out_dir: str, devices=None, base_model: str | None = None) -> dict[str, Any]:
  """Metrics of the configured eval sets (or the held-out split), outputs written under out_dir."""
  import jax

  from cispo_jax.evals.evaluator import Evaluator
  from cispo_jax.task import HELDOUT, Scorer, make_sources
  from cispo_jax.rollout.config import run_stops, sampling_config

  rl, task = configs["RLConfig"], configs["TaskConfig"]
  if not rl.model_dir:
    raise ValueError("--model_dir is required")
  sampler = ModelSampler(rl, configs["MeshConfig"], devices, base_model)
  limits = dict(max_new_tokens=rl.rollout.max_new_tokens, prompt_buckets=rl.rollout.prompt_buckets,
                apply_chat_template=rl.rollout.apply_chat_template)
  sets = task.eval_sources(sampler.tokenizer, sampler.model_cfg, **limits)
  if not sets:
    train, held = make_sources(task, seed=rl.seed)
    _, held = task.check_sources(train, held, sampler.tokenizer, sampler.model_cfg, **limits)
    sets = {HELDOUT: held[:rl.eval.eval_size]}
  stops = run_stops(rl.rollout, sampler.tokenizer, sampler.base_dir, sampler.model_cfg.vocab_size)
  log.info("stop tokens: %s", stops.describe(sampler.tokenizer))
  scorer = Scorer(task)
  try:
    evaluator = Evaluator(
        sampler.generate, sampler.local_rows, sampler.tokenizer, scorer,
        greedy_cfg=sampling_config(rl.rollout, sampler.tokenizer, stops, greedy=True, n=1),
        sampled_cfg=sampling_config(rl.rollout, sampler.tokenizer, stops, greedy=False, n=task.eval_samples)
        if task.eval_samples else None, ks=task.pass_k(), batch_size=task.eval_batch_size, seed=rl.seed)
    metrics = evaluator(sampler.params, sets, os.path.join(out_dir, "outputs.jsonl"))
  finally:
    scorer.close()
  result = {"model_dir": rl.model_dir, "sets": {name: len(ex) for name, ex in sets.items()},
            "num_samples": task.eval_samples, "metrics": metrics}
  if sampler.adapted:
    result["base_model"] = sampler.base_dir
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result


def format_table(result: dict[str, Any]) -> str:
  """One line per set: size, greedy pass@1, sampled pass@k, mean lengths, format-error rates."""
  metrics = result["metrics"]
  ks = sorted({int(k.rsplit("_", 1)[1]) for k in metrics if "/sampled/pass_at_" in k})
  head = ["set", "prompts", "greedy pass@1"] + [f"pass@{k} (n={result['num_samples']})" for k in ks]
  head += ["greedy len", "greedy fmt err"] + (["sampled len", "sampled fmt err"] if ks else [])
  rows = []
  for name, size in result["sets"].items():
    def get(key, fmt="{:.3f}"):
      value = metrics.get(f"eval/{name}/{key}")
      return "-" if value is None else fmt.format(value)
    row = [name, str(size), get("greedy/pass_at_1")] + [get(f"sampled/pass_at_{k}") for k in ks]
    row += [get("greedy/length", "{:.1f}"), get("greedy/format_error_rate")]
    row += [get("sampled/length", "{:.1f}"), get("sampled/format_error_rate")] if ks else []
    rows.append(row)
  widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def main(argv: Sequence[str] | None = None, devices=None) -> dict[str, Any]:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "httpx"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from cispo_jax import cli, sharding

  dist, rest = cli.split_distributed_args(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(rest)
  short = {k: v for k, v in vars(args).items() if k in cli.SHORTHANDS and v is not None}
  configs = cli.parse(args.gin_file, list(args.gin_param) + _bindings(args), short)
  sharding.initialize_distributed(dist.coordinator_address, dist.num_processes, dist.process_id)
  result = evaluate(configs, args.out_dir, devices, args.base_model)
  import jax

  if sharding.is_main_process():
    print(format_table(result))
    per_process = " (.p<i> per process)" if jax.process_count() > 1 else ""
    print(f"per-example outputs: {os.path.join(args.out_dir, 'outputs.jsonl')}{per_process}; "
          f"metrics: {os.path.join(args.out_dir, 'metrics.json')}")
  return result


if __name__ == "__main__":
  main()
