"""Run arms x seeds, resume what is unfinished, then write the multi-seed table and plots.

    python experiments/sweep.py cispo.gin grpo.gin dapo.gin --seeds 0 1 2 --out experiments/results/x
    python experiments/sweep.py --suite quick --seeds 0 1 2 --out experiments/results/quick
    python experiments/sweep.py 'cap2=cispo.gin@LossConfig.epsilon_high=2.0' cispo.gin --seeds 0 1

An arm is `[name=]file.gin[+file.gin...][@Binding=value...]`: gin files applied in order (found as
given, else in experiments/), then the arm's own bindings; the name defaults to the files' stems
joined by '+'. `--gin_param` adds a binding to every arm (after the arm's own).

Every run is `python -m cispo_jax.train` with RLConfig.seed = the seed and its own run dir
<root>/<arm>-s<seed>/, one after another (the machine's cores belong to one run; --in_process
runs them in this process, sharing compiled programs, for tests and tiny sweeps). A run whose
summary.json exists is not redone; an interrupted one resumes from its checkpoint. A failed run is
reported and the sweep goes on; a preempted one (exit 75, e.g. Ctrl-C) stops the sweep.

Seeds: the RL seed sets the prompt order, the sampling and the update shuffle. The start is
shared: the bootstrap model is keyed on BootstrapConfig and TaskConfig only (bootstrap.py), so
every arm and seed of a sweep over the same task loads the same warm start; the table says which
start each arm used and warns when they differ. The held-out problems do not depend on the seed
(task.EVAL_SEED): every run is scored on the same sample. The paired column (--reference) compares
arms seed by seed (same prompt order and sampling keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
EXIT_PREEMPTED = 75  # cispo_jax.trainer.EXIT_PREEMPTED (not imported: the sweep itself needs no jax)

# Named sets of arms. quick tests claims (a) the mechanism (the diag/* metrics of cispo vs grpo vs
# dapo at the default 2 updates per rollout) and (b) MiniMax-M1's deep off-policy setting (16
# updates per rollout, cispo vs dapo); full adds the mask, depths 2/8/16 and the clip sweeps.
SUITES = {
    "quick": ["cispo.gin", "grpo.gin", "dapo.gin", "cispo_u16=cispo.gin+depth_u16.gin",
              "dapo_u16=dapo.gin+depth_u16.gin"],
    "full": ["cispo.gin", "grpo.gin", "dapo.gin", "cispo_minimax_mask.gin",
             *[f"{loss}_u{u}={loss}.gin+depth_u{u}.gin" for u in (2, 8, 16) for loss in ("cispo", "grpo", "dapo")],
             "cispo_cap2.gin", "cispo_cap4.gin", "cispo_cap8.gin",
             "dapo_eh0.2.gin", "dapo_eh0.35.gin", "dapo_eh0.5.gin"],
}


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]


def find_gin(path: str) -> str:
  for candidate in (path, os.path.join(HERE, path)):
    if os.path.exists(candidate):
      return candidate
  raise ValueError(f"sweep: no gin file {path!r} (looked in the current directory and {HERE})")


def parse_arm(spec: str) -> Arm:
  """`[name=]a.gin[+b.gin...][@Binding=value...]` -> Arm; errors name the spec."""
  name = None
  m = re.match(r"^([A-Za-z0-9_.-]+)=(?=[^=@]*\.gin)", spec)  # a leading name= before the first file
  rest = spec
  if m:
    name, rest = m.group(1), spec[m.end():]
  files_part, *bindings = rest.split("@")
  files = [f for f in files_part.split("+") if f]
  if not files or any(not f.endswith(".gin") for f in files):
    raise ValueError(f"sweep: arm {spec!r}: expected [name=]file.gin[+file.gin...][@Binding=value...]")
  for b in bindings:
    if "=" not in b:
      raise ValueError(f"sweep: arm {spec!r}: binding {b!r} is not Config.field=value")
  paths = tuple(find_gin(f) for f in files)
  name = name or "+".join(os.path.splitext(os.path.basename(f))[0] for f in files)
  if re.search(r"-s\d+$", name) or "/" in name:
    raise ValueError(f"sweep: arm name {name!r} may not contain '/' or end in -s<digits> (the run dir suffix)")
  return Arm(name, paths, tuple(bindings))


def check_configs(arms: list[Arm], extra: list[str]) -> None:
  """Build every arm's configs before the first run starts: a typo fails now, naming its arm,
  not an hour into the sweep."""
  from cispo_jax import cli
  for arm in arms:
    try:
      cli.parse(list(arm.gin_files), [*arm.bindings, *extra])
    except Exception as e:  # gin and the dataclasses raise several types; all mean a bad arm
      raise SystemExit(f"sweep: arm {arm.name!r} ({' + '.join(arm.gin_files)}"
                       f"{' @ ' + ' @ '.join(arm.bindings) if arm.bindings else ''}): {type(e).__name__}: {e}") from e


def run_dir(root: str, arm: Arm, seed: int) -> str:
  return os.path.join(root, f"{arm.name}-s{seed}")


def train_argv(arm: Arm, seed: int, root: str, extra: list[str]) -> list[str]:
  argv = []
  for f in arm.gin_files:
    argv += ["--gin_file", f]
  for b in (*arm.bindings, *extra):
    argv.append(f"--gin_param={b}")
  return argv + ["--seed", str(seed), "--run_dir", run_dir(root, arm, seed)]


def run_one(arm: Arm, seed: int, root: str, extra: list[str], in_process: bool) -> str:
  """'done' (already finished), 'ran', 'failed' or 'preempted'."""
  d = run_dir(root, arm, seed)
  if os.path.exists(os.path.join(d, "summary.json")):
    print(f"= {d}: finished, skipped", flush=True)
    return "done"
  argv = train_argv(arm, seed, root, extra)
  print("+ python -m cispo_jax.train " + " ".join(argv), flush=True)
  t0 = time.perf_counter()
  if in_process:
    from cispo_jax import train
    try:
      train.main(argv)
      rc = 0
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else 1
    except Exception:  # a crashed run is a failed run, as a subprocess's would be; the sweep goes on
      traceback.print_exc()
      rc = 1
  else:
    rc = subprocess.run([sys.executable, "-m", "cispo_jax.train", *argv]).returncode
  print(f"  {d}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
  if rc == EXIT_PREEMPTED:
    return "preempted"
  return "ran" if rc == 0 and os.path.exists(os.path.join(d, "summary.json")) else "failed"


def bootstrap_start(d: str) -> str | None:
  """The model a run started from (its operative config's model_dir, or the bootstrap it built)."""
  path = os.path.join(d, "operative_config.gin")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    text = f.read()
  m = re.search(r"^# bootstrap model: RLConfig\.model_dir = '(.*)'$", text, re.M)
  if m:
    return os.path.abspath(m.group(1))
  m = re.search(r"^RLConfig\.model_dir = '(.+)'$", text, re.M)
  return os.path.abspath(m.group(1)) if m else None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("arms", nargs="*", help="[name=]file.gin[+file.gin...][@Binding=value...]")
  ap.add_argument("--suite", choices=sorted(SUITES), help="a named set of arms (added to any given)")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--gin_param", action="append", default=[], help="binding added to every run")
  ap.add_argument("--root", default="runs/sweep", help="run directories go here as <arm>-s<seed>")
  ap.add_argument("--out", default=None, help="directory for results.md/.json and the PNGs (default <root>/results)")
  ap.add_argument("--threshold", type=float, default=0.5, help="held-out pass@1 for steps / tokens to threshold")
  ap.add_argument("--reference", default=None, help="arm for the paired difference (default: the first arm)")
  ap.add_argument("--in_process", action="store_true", help="run in this process (shares compilations)")
  ap.add_argument("--dry_run", action="store_true", help="print the runs' commands and stop")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  specs = list(args.arms) + (SUITES[args.suite] if args.suite else [])
  if not specs:
    ap.error("give arms or --suite")
  try:
    arms = [parse_arm(s) for s in specs]
  except ValueError as e:
    raise SystemExit(str(e)) from None
  names = [a.name for a in arms]
  if len(set(names)) != len(names):
    raise SystemExit(f"sweep: two arms share a name: {names}")
  check_configs(arms, args.gin_param)
  if args.dry_run:
    for arm in arms:
      for seed in args.seeds:
        print("python -m cispo_jax.train " + " ".join(train_argv(arm, seed, args.root, args.gin_param)))
    return {}

  status, took = {}, []
  todo = len(arms) * len(args.seeds)
  for arm in arms:  # arm-major: a stopped sweep has whole arms done first
    for seed in args.seeds:
      t0 = time.perf_counter()
      status[(arm.name, seed)] = s = run_one(arm, seed, args.root, args.gin_param, args.in_process)
      if s == "preempted":
        raise SystemExit(EXIT_PREEMPTED)
      todo -= 1
      if s == "ran":
        took.append(time.perf_counter() - t0)
        # A rough guide for scheduling: arms differ in cost (u16 runs take longer), so it moves.
        print(f"  {todo} run(s) left, about {todo * sum(took) / len(took) / 60:.0f} min at the mean so far",
              flush=True)
  return report(arms, args, status, argv)


def report(arms: list[Arm], args, status: dict, argv: list[str]) -> dict:
  from cispo_jax.analysis import report as analysis  # here: --dry_run and the runs themselves need no jax in this process

  failed = [f"{a}-s{s}" for (a, s), st in status.items() if st == "failed"]
  dirs = [run_dir(args.root, a, s) for a in arms for s in args.seeds
          if os.path.exists(os.path.join(run_dir(args.root, a, s), "metrics.jsonl"))]
  if not dirs:
    raise SystemExit(f"sweep: no run wrote metrics (failed: {', '.join(failed) or 'none'}); nothing to tabulate")
  with_runs = {os.path.basename(d).rsplit("-s", 1)[0] for d in dirs}
  reference = args.reference or arms[0].name
  if reference not in with_runs:  # its runs all failed early: the table goes without the paired column
    print(f"sweep: reference arm {reference!r} has no runs; no paired column", flush=True)
    reference = None
  out = args.out or os.path.join(args.root, "results")
  summary = analysis.analyze(dirs, out, args.threshold, reference=reference)
  # A run that died before writing its config has no start to report: left out of the check.
  starts = {a.name: sorted({p for s in args.seeds if (p := bootstrap_start(run_dir(args.root, a, s)))})
            for a in arms}
  notes = ["", "Starts (the model each arm's runs loaded): " +
           "; ".join(f"{a}: {', '.join(v)}" for a, v in starts.items())]
  if len({tuple(v) for v in starts.values()}) > 1 or any(len(v) > 1 for v in starts.values()):
    notes.append("WARNING: the arms did not all start from one model; compare them with care.")
  if failed:
    notes.append(f"FAILED runs (left out): {', '.join(failed)}")
  notes.append(f"Command: `python experiments/sweep.py {' '.join(argv)}`")
  with open(os.path.join(out, "results.md"), "a") as f:
    f.write("\n".join(notes) + "\n")
  with open(os.path.join(out, "results.md")) as f:
    print(f.read())
  summary.update(starts=starts, failed=failed)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(analysis.json_ready(summary), f, indent=1)
  if failed:
    raise SystemExit(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}")
  return summary


if __name__ == "__main__":
  main()
