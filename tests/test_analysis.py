"""Runs over seeds: t intervals and the ScaleRL fit (stats.py), threshold crossings, tables and plots."""

import json
import math
import os

import numpy as np
import pytest

from cispo_jax.analysis import report as analysis
from cispo_jax.analysis import stats

# Student-t 0.975 quantiles (and one 0.995) from statistical tables.
T_TABLE = [(0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 4, 2.776445), (0.975, 9, 2.262157),
           (0.975, 30, 2.042272), (0.975, 1000, 1.962339), (0.995, 5, 4.032143)]


@pytest.mark.parametrize("p, df, want", T_TABLE)
def test_t_quantile_matches_tables(p, df, want):
  assert stats.t_quantile(p, df) == pytest.approx(want, rel=1e-5)
  assert stats.t_quantile(1 - p, df) == pytest.approx(-want, rel=1e-5)
  assert stats.t_cdf(want, df) == pytest.approx(p, abs=1e-7)


def test_t_quantile_refuses_bad_input():
  with pytest.raises(ValueError, match="p=1.5"):
    stats.t_quantile(1.5, 3)
  with pytest.raises(ValueError, match="df=0"):
    stats.t_quantile(0.9, 0)


def test_mean_ci_known_values():
  mean, half = stats.mean_ci([1.0, 2.0, 3.0])
  assert mean == 2.0
  assert half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
  assert stats.mean_ci([0.4])[0] == 0.4 and math.isnan(stats.mean_ci([0.4])[1])
  assert all(math.isnan(v) for v in stats.mean_ci([]))
  assert stats.mean_ci([0.5, None, 0.7])[0] == pytest.approx(0.6)  # missing values left out


def test_mean_ci_covers_the_true_mean_at_its_level():
  rng = np.random.default_rng(0)
  covered = []
  for _ in range(2000):
    x = rng.normal(0.3, 0.1, 4)
    m, h = stats.mean_ci(x)
    covered.append(abs(m - 0.3) <= h)
  assert np.mean(covered) == pytest.approx(0.95, abs=0.015)


TRUE = dict(R0=0.2, A=0.75, B=1.3, C_mid=3e5)


def _synthetic(noise, seed=0, n=16):
  C = np.concatenate([[0.0], np.geomspace(2e4, 5e6, n)])
  R = stats.scalerl_curve(C, **TRUE)
  R[1:] += np.random.default_rng(seed).normal(0, noise, n)
  return C, R


def test_fit_recovers_known_parameters_exactly_without_noise():
  fit = stats.fit_scalerl(*_synthetic(0.0))
  assert fit["R0"] == TRUE["R0"]
  assert fit["A"] == pytest.approx(TRUE["A"], rel=1e-3)
  assert fit["B"] == pytest.approx(TRUE["B"], rel=1e-2)
  assert fit["C_mid"] == pytest.approx(TRUE["C_mid"], rel=1e-2)
  assert fit["rmse"] < 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_parameters_under_noise(seed):
  fit = stats.fit_scalerl(*_synthetic(0.01, seed))
  assert fit["A"] == pytest.approx(TRUE["A"], abs=0.03)
  assert fit["B"] == pytest.approx(TRUE["B"], rel=0.25)
  assert fit["C_mid"] == pytest.approx(TRUE["C_mid"], rel=0.25)
  assert fit["rmse"] == pytest.approx(0.01, rel=0.5)


def test_fit_flags_flat_and_unbent_curves():
  C = np.concatenate([[0.0], np.geomspace(1e3, 1e5, 10)])
  flat = stats.fit_scalerl(C, np.full(11, 0.3))
  assert flat["B"] is None and flat["C_mid"] is None and flat["A"] == pytest.approx(0.3, abs=0.02)
  early = stats.fit_scalerl(C, stats.scalerl_curve(C, 0.2, 0.9, 1.0, 1e6))  # only the foot of the curve
  assert early["beyond_data"] and early["C_mid"] > C.max()
  assert not stats.fit_scalerl(*_synthetic(0.0))["beyond_data"]


def test_fit_refuses_too_few_points():
  with pytest.raises(ValueError, match="needs >= 3"):
    stats.fit_scalerl([0, 1, 2], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="no point at C == 0"):
    stats.fit_scalerl([1, 2, 3], [0.1, 0.2, 0.3])


def test_first_crossing():
  assert analysis.first_crossing([0, 10, 20, 30], [0.1, 0.4, 0.6, 0.5], 0.5) == 20
  assert analysis.first_crossing([0, 10], [0.1, 0.2], 0.5) is None


def _fake_run(root, name, curve, tokens_per_iter=100.0, eval_every=2, passes=2, finished=True):
  """A run directory as the trainer writes it: eval at 0 and every eval_every iterations."""
  d = os.path.join(root, name)
  os.makedirs(d)
  rows = [{"iteration": 0, "eval/pass_at_1": curve[0]}]
  for it in range(1, eval_every * (len(curve) - 1) + 1):
    row = {"iteration": it, "tokens/generated": tokens_per_iter, "reward/mean": 0.1,
           "train/diag/removed": 0.01 * it, "train/diag/zeroed_pos_hi": 0.02, "train/diag/zeroed_pos_xhi": 0.01}
    if it % eval_every == 0:
      row["eval/pass_at_1"] = curve[it // eval_every]
    rows.append(row)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(os.path.join(d, "operative_config.gin"), "w") as f:
    f.write(f"UpdateConfig.num_iterations = {passes}\nUpdateConfig.num_minibatches = 1\n")
  if finished:
    with open(os.path.join(d, "summary.json"), "w") as f:
      json.dump({"eval_start": curve[0], "eval_end": curve[-1], "seconds": 120.0}, f)
  return d


def test_read_run_compute_axes(tmp_path):
  d = _fake_run(tmp_path, "cispo-s3", [0.2, 0.3, 0.5, 0.45], tokens_per_iter=50.0, passes=4)
  run = analysis.read_run(d)
  assert (run.arm, run.seed, run.finished, run.updates_per_rollout) == ("cispo", 3, True, 4)
  np.testing.assert_array_equal(run.eval_iteration, [0, 2, 4, 6])
  np.testing.assert_array_equal(run.compute["rollout_tokens"], [0, 100, 200, 300])
  np.testing.assert_array_equal(run.compute["update_tokens"], [0, 400, 800, 1200])
  assert (run.final, run.best) == (0.45, 0.5)
  assert run.diag_removed == pytest.approx(0.01 * np.mean(np.arange(1, 7)))
  assert run.diag_zeroed_pos_high == pytest.approx(0.03)


def test_read_run_of_a_run_recorded_before_rl_config_had_sections(tmp_path):
  d = _fake_run(tmp_path, "cispo-s0", [0.2, 0.3], passes=4)
  with open(os.path.join(d, "operative_config.gin"), "w") as f:  # the keys as they were written then
    f.write("RLConfig.num_iterations = 4\nRLConfig.num_minibatches = 2\n")
  run = analysis.read_run(d)
  assert run.updates_per_rollout == 8
  np.testing.assert_array_equal(run.compute["update_tokens"], [0, 800])


def test_read_run_errors_name_the_directory(tmp_path):
  with pytest.raises(ValueError, match="empty-s0"):
    os.makedirs(tmp_path / "empty-s0")
    analysis.read_run(str(tmp_path / "empty-s0"))


def test_a_sweep_root_stands_for_its_runs(tmp_path):
  a = _fake_run(tmp_path, "cispo-s0", [0.2, 0.3])
  b = _fake_run(tmp_path, "grpo-s1", [0.2, 0.4])
  os.makedirs(tmp_path / "results")  # not a run: left out
  assert analysis.expand_run_dirs([str(tmp_path)]) == [a, b]
  assert analysis.expand_run_dirs([a]) == [a]


def test_the_same_arm_and_seed_twice_is_refused(tmp_path):
  a = _fake_run(tmp_path / "a", "cispo-s0", [0.2, 0.3])
  b = _fake_run(tmp_path / "b", "cispo-s0", [0.2, 0.4])
  with pytest.raises(ValueError, match="two runs of arm 'cispo' with seed 0"):
    analysis.group_runs([analysis.read_run(a), analysis.read_run(b)])


def test_summary_table_and_plots(tmp_path):
  runs = tmp_path / "runs"
  os.makedirs(runs)
  dirs = []
  for s, shift in enumerate([0.0, 0.02, -0.02]):
    a = np.clip(stats.scalerl_curve(np.arange(0, 12) * 200.0, 0.2, 0.8, 1.5, 600.0) + shift, 0, 1)
    b = np.clip(a - 0.1, 0, 1)
    b[0] = a[0]
    dirs.append(_fake_run(runs, f"cispo-s{s}", list(a)))
    dirs.append(_fake_run(runs, f"grpo-s{s}", list(b)))
  dirs.append(_fake_run(runs, "grpo-s9", [0.2, 0.3], finished=False))
  out = tmp_path / "out"
  summary = analysis.main(dirs + ["--out", str(out), "--threshold", "0.5", "--reference", "cispo"])
  cispo, grpo = summary["arms"]["cispo"], summary["arms"]["grpo"]
  assert cispo["seeds"] == [0, 1, 2] and grpo["seeds"] == [0, 1, 2]
  assert grpo["unfinished"] == [str(runs / "grpo-s9")]
  assert grpo["final_minus_reference"]["mean"] == pytest.approx(-0.1, abs=1e-9)
  assert grpo["final_minus_reference"]["pairs"] == 3
  assert cispo["to_threshold_iteration"]["reached"] == 3
  assert cispo["fit"]["A"][0] == pytest.approx(0.8, abs=0.05)
  text = (out / "results.md").read_text()
  assert "| cispo | 3 |" in text and "grpo-s9" in text
  for name in ("curves_step.png", "curves_rollout_tokens.png", "diag.png", "results.json"):
    assert (out / name).stat().st_size > 0
  loaded = json.loads((out / "results.json").read_text())  # strict JSON: NaN written as null
  assert loaded["arms"]["cispo"]["final"][0] == pytest.approx(cispo["final"][0])
