"""Statistics for runs over seeds: Student-t intervals and ScaleRL's saturating curve fit.

Pure numpy (no scipy: the t quantile is computed here from the regularised incomplete beta).
cispo_jax/analysis/report.py applies them to run directories.

ScaleRL's fit (arXiv:2510.13786): R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B), R0 the value at
C = 0, A the asymptote, B the scaling exponent, C_mid the compute at half the gain.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
  tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 500):
    m2 = 2 * m
    for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
      d = 1.0 + aa * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + aa / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < 1e-15:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """I_x(a, b), the regularised incomplete beta function."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; else use symmetry
    return front * _betacf(a, b, x) / a
  return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with df degrees of freedom."""
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
  return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
  """The p-quantile of Student's t (bisection on t_cdf, to 1e-10)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"t_quantile: p={p} must be in (0, 1)")
  if not df > 0:
    raise ValueError(f"t_quantile: df={df} must be > 0")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    lo, hi = hi, 2.0 * hi
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    if hi - lo < 1e-10 * max(1.0, hi):
      break
  return 0.5 * (lo + hi)


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
  """(mean, half-width of the two-sided t interval). One value: (value, nan); none: (nan, nan)."""
  x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
  if x.size == 0:
    return math.nan, math.nan
  if x.size == 1:
    return float(x[0]), math.nan
  half = t_quantile(0.5 + level / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
  return float(x.mean()), float(half)


def scalerl_curve(C, R0: float, A: float, B: float, C_mid: float):
  C = np.asarray(C, np.float64)
  with np.errstate(divide="ignore", over="ignore"):
    s = 1.0 / (1.0 + (C_mid / np.maximum(C, 1e-300)) ** B)
  return R0 + (A - R0) * np.where(C > 0, s, 0.0)


def _best_A(s, y, R0, A_bounds):
  """Least-squares A for fixed (B, C_mid): y - R0 = (A - R0) s is linear in A; clipped to bounds
  (a 1-d quadratic, so the clipped optimum is the constrained one)."""
  A = R0 + (s @ y) / max(s @ s, 1e-300)
  return float(np.clip(A, *A_bounds))


def fit_scalerl(C, R, R0: float | None = None, *, A_bounds=(0.0, 1.0), B_range=(0.1, 10.0),
                min_gain: float = 0.02) -> dict:
  """Fit ScaleRL's sigmoid to one curve. R0 defaults to R at C == 0 (the first eval).

  A grid over (log B, log C_mid), A in closed form at each point, then two rounds of a finer grid
  around the best: no starting guess to get wrong and no optimiser to diverge. C_mid ranges over
  [C_min / 10, C_max * 10] of the points with C > 0. Returns A, B, C_mid, R0, rmse, n_points and
  beyond_data (C_mid > the largest C: the curve has not bent yet, so A and C_mid are
  extrapolated). A curve with |A - R0| < min_gain has no shape to fit: B and C_mid are None then.
  """
  C, R = np.asarray(C, np.float64), np.asarray(R, np.float64)
  if C.shape != R.shape or C.ndim != 1:
    raise ValueError(f"fit_scalerl: C and R must be 1-d of one length, got {C.shape} and {R.shape}")
  if R0 is None:
    if not (C == 0).any():
      raise ValueError("fit_scalerl: no point at C == 0 to take R0 from; pass R0")
    R0 = float(R[C == 0][0])
  keep = C > 0
  C, R = C[keep], R[keep]
  if C.size < 3:
    raise ValueError(f"fit_scalerl: {C.size} points with C > 0; the fit of A, B, C_mid needs >= 3")
  y = R - R0
  logB = np.linspace(math.log(B_range[0]), math.log(B_range[1]), 61)
  logM = np.linspace(math.log(C.min() / 10), math.log(C.max() * 10), 81)
  logC = np.log(C)

  def sse(lb, lm):
    s = 1.0 / (1.0 + np.exp(np.exp(lb) * (lm - logC)))
    A = _best_A(s, y, R0, A_bounds)
    return float(((A - R0) * s - y) @ ((A - R0) * s - y)), A

  best = None
  for _ in range(3):  # the grid, then two finer grids around its best point
    for lb in logB:
      for lm in logM:
        err, A = sse(lb, lm)
        if best is None or err < best[0]:
          best = (err, A, lb, lm)
    db, dm = 2 * (logB[1] - logB[0]), 2 * (logM[1] - logM[0])
    logB = np.linspace(best[2] - db, best[2] + db, 21)
    logM = np.linspace(best[3] - dm, best[3] + dm, 21)
  err, A, lb, lm = best
  flat = abs(A - R0) < min_gain
  return {"A": A, "B": None if flat else float(math.exp(lb)), "C_mid": None if flat else float(math.exp(lm)),
          "R0": float(R0), "rmse": math.sqrt(err / C.size), "n_points": int(C.size),
          "beyond_data": bool((not flat) and math.exp(lm) > C.max())}
