"""Weights & Biases as a metrics backend (optional: `pip install wandb`; see requirements-dev.txt).

Offline runs work without a network: WANDB_MODE=offline writes the run under <run_dir>/wandb for a
later `wandb sync`. The run id is kept in <run_dir>/wandb_run_id, so a resumed training run logs
into the same wandb run. wandb cannot delete logged points: after a resume, the iterations redone
since the checkpoint are logged again at their step numbers, which wandb drops as already seen;
metrics.jsonl (rows after the checkpoint rewritten) stays the record of truth.
"""

from __future__ import annotations

import ast
import os
import secrets


class WandbSink:

  def __init__(self, run_dir: str, project: str, config: dict, resume_from: int | None):
    try:
      import wandb
    except ImportError:
      raise ValueError("RLConfig.wandb_project is set but the wandb package is not installed: "
                       "`pip install wandb`, or leave wandb_project empty") from None
    id_path = os.path.join(run_dir, "wandb_run_id")
    run_id = None
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip() or None
    if run_id is None:
      run_id = secrets.token_hex(4)  # wandb ids are [a-z0-9]
      with open(id_path, "w") as f:
        f.write(run_id)
    os.makedirs(os.path.join(run_dir, "wandb"), exist_ok=True)
    self.run = wandb.init(project=project, dir=run_dir, id=run_id, resume="allow", config=_values(config),
                          name=os.path.basename(os.path.abspath(run_dir)))

  def log(self, iteration: int, metrics: dict) -> None:
    self.run.log(metrics, step=iteration)

  def close(self) -> None:
    import wandb
    self.run.finish()
    # finish() can return before wandb-core has written the run's records to <run>.wandb (seen with
    # 0.31 in offline mode: only the file header on disk); shutting the service down waits for it.
    wandb.teardown()


def _values(bindings: dict) -> dict:
  """Operative-config bindings ('0.0002', "'cispo'") as Python values, so wandb can filter and plot by them."""
  out = {}
  for key, text in bindings.items():
    try:
      value = ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError):
      value = text
    out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
  return out
