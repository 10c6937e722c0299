"""Is this run healthy? One command turns run directories into a picture and a verdict per metric.

    python report.py RUN_DIR [RUN_DIR ...] [--out report.png] [--json] [--group-by FIELD]

Reads the TensorBoard events that every script of this repository writes (and `args.json` / `summary.json`
beside them), checks each logged metric against the bands in THRESHOLDS below, prints one line per check

    PASS|WARN|FAIL  <metric>  <what was measured>  <likely cause and what to try>

and a last line with the counts, and writes one PNG: a panel per metric with its healthy band shaded and the
verdict in its title (default RUN_DIR/report.png for one run, ./report.png for several). Exit status: 1 when
any check FAILs, 0 otherwise, 2 for bad input (a directory without events, an unknown --group-by field).
`--json` prints one JSON object instead of the lines. A RUN_DIR without event files of its own but with run
directories inside it (e.g. `runs/`) stands for all of them.

Several runs: the curves are overlaid, grouped by an `args.json` field (`--group-by network` for
ppo_procgen_impala.py's IMPALA vs Nature CNN; default: each run on its own), with the mean and the spread
over the seeds of each group, and a line per group with its final return (mean +- std over seeds).

The bands are set for this repository's definitions (docs/conventions.md, "Metrics"): every loss statistic
is the mean over all minibatches of an update, so `losses/approx_kl` (k3) includes the first minibatch,
whose KL is exactly 0, and runs at about half of CleanRL's last-minibatch value; `debug/grad_norm` is the
mean norm before clipping. They were calibrated on runs of every script's defaults (README, "Is my run
healthy?"); docs/report.md has the measurements. This is a tool, not an algorithm script: it imports
matplotlib (the `dev` extra) and tensorboard's protobuf definitions, and none of the harness rules apply.
"""

import argparse
import json
import math
import os
import struct
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

# --------------------------------------------- THE THRESHOLDS ---------------------------------------------
# Every number the checks compare with, in one table (README, "Is my run healthy?", explains each).
# A "quarter" is a quarter of the metric's logged points (iterations, or iterations with ended episodes).
THRESHOLDS = {
    # charts/episodic_return: Welch's t of the last quarter's returns against the first quarter's
    "return_t": 2.0,  # |t| above this: rising (PASS) or falling (WARN); below: flat (WARN)
    "return_effect": 1.0,  # ... and a peak, or a fall from it, counts when also Cohen's d above this
    "return_collapse_keep": 0.5,  # FAIL: after a significant peak, the last quarter keeps < 50% of the gain
    "return_drop_keep": 0.8,  # WARN: ... keeps 50-80% of the gain from the first quarter to the peak
    "return_min_points": 8,  # fewer episodes-logging iterations than this: too short to judge (WARN)
    # losses/approx_kl (mean over every minibatch of the update, k3); small is healthy: one-sided
    "kl_warn": 0.02,  # median above this: WARN (about 0.04 in CleanRL's last-minibatch terms)
    "kl_fail": 0.05,  # median above this: FAIL
    "kl_spike": 0.1,  # any single update above this: WARN (a spike)
    "kl_spike_fail": 1.0,  # any single update above this: FAIL (that update replaced the policy)
    # losses/clipfrac (fraction of samples whose ratio left [1 - clip, 1 + clip], mean over minibatches)
    "clipfrac_warn": 0.2,  # median above this: WARN
    "clipfrac_fail": 0.35,  # median above this: FAIL
    # debug/relative_entropy (entropy / log |A|: 1 is the uniform policy); discrete actions only
    "entropy_early_floor": 0.1,  # median over the first quarter below this: premature convergence (WARN)
    "entropy_never_falls": 0.95,  # last quarter's median above 95% of the first points': never falling (WARN)
    "entropy_min_updates": 50,  # ... judged from this many updates on (a shorter run: too early to tell)
    # losses/explained_variance (EV) and debug/residual_variance (1 - EV)
    "ev_learned": 0.1,  # FAIL: the 90th percentile of EV below this: the value function never learned ...
    "ev_min_updates": 50,  # ... judged from this many updates on (a critic may take that long to start)
    "ev_rising_t": 3.0,  # ... unless EV rises: the t statistic of its least-squares slope above this
    "ev_late": 0.0,  # WARN: the median EV of the last half below this (residual variance >= 1) ...
    "adv_std_vanished": 0.01,  # ... unless the advantage std fell below 1% of its peak (returns constant)
    # debug/advantage_mean and debug/advantage_std (raw GAE advantages, before any normalisation)
    "adv_mean_ratio": 1.0,  # WARN: median |mean| / std over the last half above this
    "adv_std_drift": 10.0,  # WARN: the std's last-quarter median off its first-quarter median by more
    # debug/grad_norm against --max-grad-norm
    "grad_clipped_every": 0.99,  # "clipped on every update": this fraction of updates above the maximum
    "grad_ratio_warn": 1000.0,  # WARN: median grad norm above 1000x --max-grad-norm: steps scaled to nothing
}

VERDICTS = ("PASS", "WARN", "FAIL")
# summary.json statuses that end a run for good (docs/conventions.md, "Outputs")
FAILED_STATUSES = ("non-finite loss", "crashed", "aborted", "rank failed", "no space left on device")
# metrics allowed to be NaN: the explained variance is undefined when the returns are constant (probes)
MAY_BE_UNDEFINED = ("losses/explained_variance", "debug/residual_variance")


class ReportError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ------------------------------------------------ READING -------------------------------------------------
def read_scalars(run_dir: str) -> dict:
    """{tag: (steps, values)} of every scalar in the run's TensorBoard event files, sorted by step.

    The files are TFRecords (length, crc, an Event protobuf, crc), parsed here directly: tensorboard's
    EventAccumulator takes seconds for the ~100k scalars of a long Atari run, this a fraction of one.
    A record still being written (a live run) ends the file early; resumed runs write several files, and a
    step logged twice (the iterations after the last checkpoint, done again) keeps its latest value.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.util import tensor_util

    raw = {}
    names = sorted((n for n in os.listdir(run_dir) if n.startswith("events.out.tfevents")), key=written_at)
    for name in names:
        path = os.path.join(run_dir, name)
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            end = pos + 12 + length
            if end + 4 > len(data):
                break
            try:
                event = Event.FromString(data[pos + 12 : end])
            except Exception as e:  # protobuf's DecodeError: not an event file
                raise ReportError(f"{path}: not a TensorBoard event file ({e})") from e
            pos = end + 4
            for v in event.summary.value:
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    value = v.simple_value
                elif kind == "tensor" and v.metadata.plugin_data.plugin_name == "scalars":
                    value = float(tensor_util.make_ndarray(v.tensor))
                else:
                    continue  # text (the hyperparameters), images, histograms
                steps, values = raw.setdefault(v.tag, ([], []))
                steps.append(event.step)
                values.append(value)
    out = {}
    for tag, (steps, values) in raw.items():
        s, x = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
        order = np.argsort(s, kind="stable")
        s, x = s[order], x[order]
        last = np.append(s[1:] != s[:-1], True)  # the last value written at each step
        out[tag] = (s[last], x[last])
    return out


def written_at(name: str) -> tuple:
    """The order in which event files were written: events.out.tfevents.<unix time>.<host>.<pid>.<n>."""
    stamp = name.split(".")[3] if name.count(".") >= 3 else ""
    return (int(stamp) if stamp.isdigit() else 0, name)


@dataclass
class Run:
    path: str
    args: dict  # args.json ({} if missing)
    summary: dict  # summary.json ({} while the run is going, or after a SIGKILL)
    scalars: dict  # {tag: (steps, values)}

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def values(self, tag: str) -> np.ndarray:
        return self.scalars[tag][1] if tag in self.scalars else np.array([])

    def final_return(self) -> float:
        """The mean return of the last 100 episodes (summary.json), else of the last tenth of the logged
        points (NaN without episodes)."""
        if isinstance(self.summary.get("episodic_return_mean_last100"), int | float):
            return float(self.summary["episodic_return_mean_last100"])
        r = self.values("charts/episodic_return")
        return float(np.mean(r[-max(1, len(r) // 10) :])) if len(r) else float("nan")


def has_events(path: str) -> bool:
    return any(n.startswith("events.out.tfevents") for n in os.listdir(path))


def load_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read it ({e})") from e


def load_runs(paths: list) -> list:
    """Run directories: each path itself, or the run directories inside it (one level) when it holds none."""
    dirs = []
    for path in paths:
        if not os.path.isdir(path):
            raise ReportError(f"{path}: no such directory")
        if has_events(path):
            dirs.append(path)
            continue
        inside = sorted(
            os.path.join(path, n) for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))
        )
        inside = [d for d in inside if has_events(d)]
        if not inside:
            raise ReportError(f"{path}: no TensorBoard event files (events.out.tfevents.*) in it or below it")
        dirs.extend(inside)
    runs = []
    for d in dirs:
        run = Run(d, load_json(os.path.join(d, "args.json")), load_json(os.path.join(d, "summary.json")), {})
        run.scalars = read_scalars(d)
        if not run.scalars:
            raise ReportError(f"{d}: the event files hold no scalars yet")
        runs.append(run)
    return runs


# ------------------------------------------------ CHECKS --------------------------------------------------
@dataclass
class Check:
    verdict: str  # PASS, WARN or FAIL
    metric: str  # the logged name (or summary/status, all_metrics)
    measured: str  # what was measured
    advice: str  # the likely cause and what to try (for a PASS: what the level means)
    value: Optional[float] = None  # the number compared with the thresholds, for --json


def quarters(x: np.ndarray):
    q = max(1, len(x) // 4)
    return x[:q], x[-q:]


def welch_t(a: np.ndarray, b: np.ndarray) -> float:
    """Welch's t of mean(a) - mean(b); 0 for two equal constants, +-inf for two different ones."""
    diff = float(np.mean(a) - np.mean(b))
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)) if min(len(a), len(b)) > 1 else 0
    if se == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / se


def cohen_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean(a) - mean(b)) over the pooled standard deviation: the size of a difference against the noise."""
    diff = float(np.mean(a) - np.mean(b))
    sd = math.sqrt((float(np.var(a)) + float(np.var(b))) / 2)
    return diff / sd if sd > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))


def slope_t(y: np.ndarray) -> float:
    """The t statistic of the least-squares slope of y against its index (0 for fewer than 3 points)."""
    if len(y) < 3:
        return 0.0
    x = np.arange(len(y), dtype=float) - (len(y) - 1) / 2
    b = float(np.dot(x, y - y.mean()) / np.dot(x, x))
    residual = y - y.mean() - b * x
    se = math.sqrt(float(np.dot(residual, residual)) / (len(y) - 2) / float(np.dot(x, x)))
    return b / se if se > 0 else (0.0 if b == 0 else math.copysign(math.inf, b))


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Moving average over `window` points (shorter at the start), as long as x."""
    window = max(1, min(window, len(x)))
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty(len(x))
    out[window - 1 :] = (c[window:] - c[:-window]) / window
    out[: window - 1] = c[1:window] / np.arange(1, window)
    return out


def fmt(x: float) -> str:
    if not np.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"


def check_return(run: Run, t: dict) -> tuple:
    """Rising, flat, falling, or collapsing after a peak. Returns (check, trend) with trend one of
    'rising', 'flat', 'falling', 'dropped', 'collapsed', 'short'; the other checks read it.

    The peak is the best window of a quarter of the points. A fall from it counts when it is significant
    (Welch t) and large (Cohen's d, against the noise of single iterations): the best of many windows of
    a flat, noisy curve is always a little above the rest, never by a whole standard deviation."""
    tag = "charts/episodic_return"
    steps, r = run.scalars[tag]
    ok = np.isfinite(r)
    steps, r = steps[ok], r[ok]
    if len(r) < t["return_min_points"]:
        return Check("WARN", tag, f"{len(r)} points", "too short to judge the trend: run longer"), "short"
    first, last = quarters(r)
    q = len(first)
    c = np.cumsum(np.insert(r, 0, 0.0))
    at = int(np.argmax(c[q:] - c[:-q]))  # the window r[at : at + q] has the best mean
    peak = r[at : at + q]
    start, end, top = float(np.mean(first)), float(np.mean(last)), float(np.mean(peak))
    t_rise = welch_t(last, first)
    peaked = welch_t(peak, first) > t["return_t"] and cohen_d(peak, first) > t["return_effect"]
    fell = welch_t(peak, last) > t["return_t"] and cohen_d(peak, last) > t["return_effect"]
    keep = (end - start) / (top - start) if top > start else 1.0
    measured = f"first quarter {fmt(start)}, best {fmt(top)} near step {steps[at + q // 2]:,}, last quarter {fmt(end)}"
    if peaked and fell and keep < t["return_collapse_keep"]:
        advice = (
            f"collapsed after a peak (keeps {keep:.0%} of the gain): the policy stepped off a cliff; lower "
            "--learning-rate or --update-epochs, use --anneal-lr or --target-kl, and see losses/approx_kl"
        )
        return Check("FAIL", tag, measured, advice, keep), "collapsed"
    if peaked and fell and keep < t["return_drop_keep"]:
        advice = f"fell from its peak (keeps {keep:.0%} of the gain): unstable late; see approx_kl, entropy"
        return Check("WARN", tag, measured, advice, keep), "dropped"
    measured = f"first quarter {fmt(start)} -> last quarter {fmt(end)} (Welch t {t_rise:.1f})"
    if t_rise > t["return_t"]:
        return Check("PASS", tag, measured, "rising", t_rise), "rising"
    if t_rise < -t["return_t"]:
        advice = "falling from the start: check the reward's sign and scale, and --learning-rate"
        return Check("WARN", tag, measured, advice, t_rise), "falling"
    advice = (
        "flat: not learning (yet); a longer run, or check --learning-rate, the reward scale, and the "
        "relative entropy (a policy that never moves)"
    )
    if np.ptp(r) == 0:
        advice = (
            "constant: every episode returns the same (solved from the start, or a reward that never varies)"
        )
    return Check("WARN", tag, measured, advice, t_rise), "flat"


def check_kl(run: Run, t: dict):
    tag = "losses/approx_kl"
    steps, kl = run.scalars[tag]
    ok = np.isfinite(kl)
    steps, kl = steps[ok], kl[ok]
    if not len(kl):
        return None
    med, top = float(np.median(kl)), float(np.max(kl))
    measured = f"median {fmt(med)}, max {fmt(top)} at step {steps[np.argmax(kl)]:,}"
    cause = "learning rate or epochs too high: lower --learning-rate or --update-epochs, or set --target-kl"
    if med > t["kl_fail"]:
        return Check("FAIL", tag, measured, f"far too large: {cause}", med)
    if med > t["kl_warn"]:
        return Check("WARN", tag, measured, f"large: {cause}", med)
    if top > t["kl_spike_fail"]:
        advice = f"an update replaced the policy (KL above {t['kl_spike_fail']}): {cause}"
        return Check("FAIL", tag, measured, advice, top)
    if top > t["kl_spike"]:
        return Check("WARN", tag, measured, f"spikes above {t['kl_spike']}: {cause}", top)
    note = "small and steady (the mean over every minibatch, the first at 0: about half CleanRL's)"
    if med < t["kl_warn"] / 100:
        note = (
            "tiny: the policy moves little per update, which is no fault (lr annealed, or clipped gradients)"
        )
    return Check("PASS", tag, measured, note, med)


def check_clipfrac(run: Run, t: dict):
    tag = "losses/clipfrac"
    c = run.values(tag)
    c = c[np.isfinite(c)]
    if not len(c):
        return None
    med = float(np.median(c))
    measured = f"median {fmt(med)}, max {fmt(float(np.max(c)))}"
    cause = "each update moves the policy too far: lower --learning-rate or --update-epochs, or --target-kl"
    if med > t["clipfrac_fail"]:
        return Check("FAIL", tag, measured, f"most ratios clipped: {cause}", med)
    if med > t["clipfrac_warn"]:
        return Check("WARN", tag, measured, f"many ratios clipped: {cause}", med)
    note = "in the usual range" if med > 0.01 else "few ratios clipped: small updates, which is no fault"
    return Check("PASS", tag, measured, note, med)


def check_entropy(run: Run, t: dict):
    tag = "debug/relative_entropy"
    h = run.values(tag)
    h = h[np.isfinite(h)]
    if len(h) < 4:
        return None
    first, last = quarters(h)
    start = float(np.median(h[: max(1, len(h) // 20)]))
    early, end = float(np.median(first)), float(np.median(last))
    measured = f"first 5% {fmt(start)}, first quarter {fmt(early)}, last quarter {fmt(end)}"
    if early < t["entropy_early_floor"]:
        advice = (
            "collapsed early (premature convergence): raise --ent-coef, lower --learning-rate; "
            "check the reward scale (large advantages sharpen the policy fast)"
        )
        return Check("WARN", tag, measured, advice, early)
    if end > t["entropy_never_falls"] * start:
        if len(h) < t["entropy_min_updates"]:
            note = f"not falling yet: too early to tell after {len(h)} updates (it falls over a long run)"
            return Check("PASS", tag, measured, note, end / start)
        advice = "never falling: the policy stays near its start; check --learning-rate and --ent-coef"
        return Check("WARN", tag, measured, advice, end / start)
    return Check("PASS", tag, measured, "falling gradually", end)


def check_value(run: Run, t: dict):
    """Explained variance (residual variance = 1 - EV): the value function must learn something."""
    tag = "losses/explained_variance"
    ev = run.values(tag)
    undefined = int(np.sum(~np.isfinite(ev)))
    ok = np.isfinite(ev)
    ev = ev[ok]
    note_undefined = f"; undefined on {undefined} updates (constant returns)" if undefined else ""
    if not len(ev):
        return Check("WARN", tag, "undefined on every update", "the returns never vary: nothing to explain")
    best = float(np.percentile(ev, 90))
    late = float(np.median(ev[len(ev) // 2 :]))
    measured = f"90th percentile {fmt(best)}, median of the last half {fmt(late)}{note_undefined}"
    rising = slope_t(ev)
    if best < t["ev_learned"] and rising > t["ev_rising_t"] and late > 0:
        note = (
            f"low but rising (the slope's t {rising:.1f}): the critic is learning, "
            "slowly; usual on CartPole, whose explained variance stays low for the first ~50k steps"
        )
        return Check("PASS", tag, measured, note, best)
    if best < t["ev_learned"] and len(ev) < t["ev_min_updates"]:
        note = f"low, but too early to tell after {len(ev)} updates (judged from {t['ev_min_updates']} on)"
        return Check("PASS", tag, measured, note, best)
    if best < t["ev_learned"]:
        advice = (
            "the value function is not learning (residual variance ~1 or more throughout): check --vf-coef "
            "(0 freezes the critic), the critic's gradient, and the reward scale"
        )
        return Check("FAIL", tag, measured, advice, best)
    if late < t["ev_late"]:
        adv = run.values("debug/advantage_std")
        adv = adv[np.isfinite(adv)]
        if len(adv) and float(np.median(quarters(adv)[1])) < t["adv_std_vanished"] * float(np.max(adv)):
            advice = (
                "low late, as on CartPole at its 500-step limit: the returns are nearly constant there (the "
                "advantage std fell over 100x), so the residual variance is noise; the environment, not a bug"
            )
            return Check("PASS", tag, measured, advice, late)
        advice = (
            "residual variance >= 1 in the last half: the critic fell behind the returns; try a larger "
            "--vf-coef, reward normalisation, or a lower --learning-rate"
        )
        return Check("WARN", tag, measured, advice, late)
    note = "the value function explains the returns"
    if late < 0.5:
        note = "low but positive: usual early on and on CartPole, whose returns are hard to predict"
    return Check("PASS", tag, measured, note, late)


def check_advantages(run: Run, t: dict, trend: str) -> list:
    out = []
    mean, std = run.values("debug/advantage_mean"), run.values("debug/advantage_std")
    if len(mean) < 4 or len(mean) != len(std):
        return out
    ok = np.isfinite(mean) & np.isfinite(std)
    mean, std = mean[ok], std[ok]
    half = slice(len(mean) // 2, None)
    ratio = float(np.median(np.abs(mean[half]) / np.maximum(std[half], 1e-12)))
    sign = float(np.median(mean[half]))
    measured = f"median |mean| / std over the last half {fmt(ratio)} (mean {fmt(sign)})"
    if ratio <= t["adv_mean_ratio"]:
        out.append(Check("PASS", "debug/advantage_mean", measured, "close to zero", ratio))
    elif sign > 0 and trend in ("rising", "short"):
        note = "positive: the critic lags a rising return, usual while it rises"
        out.append(Check("PASS", "debug/advantage_mean", measured, note, ratio))
    else:
        advice = (
            "far from zero: the critic is biased (over-estimates if negative); check --vf-coef, --gamma, "
            "--gae-lambda and the reward scale"
        )
        out.append(Check("WARN", "debug/advantage_mean", measured, advice, ratio))

    first, last = quarters(std)
    s0, s1 = float(np.median(first)), float(np.median(last))
    drift = s1 / s0 if s0 > 0 else (1.0 if s1 == 0 else math.inf)
    measured = f"first quarter {fmt(s0)}, last quarter {fmt(s1)} (x{fmt(drift)})"
    if 1 / t["adv_std_drift"] <= drift <= t["adv_std_drift"]:
        out.append(Check("PASS", "debug/advantage_std", measured, "stable", drift))
    elif drift > 1 and trend in ("rising", "short"):
        note = "grows with the return (unnormalised rewards): usual while the return rises"
        out.append(Check("PASS", "debug/advantage_std", measured, note, drift))
    elif drift < 1 and trend in ("rising", "flat") and is_at_peak(run):
        note = "shrinks as the returns become predictable (e.g. CartPole at its 500-step limit): no fault"
        out.append(Check("PASS", "debug/advantage_std", measured, note, drift))
    else:
        advice = (
            "drifting: the return scale or the critic changed a lot; normalise rewards, check the critic "
            "(losses/explained_variance)"
        )
        out.append(Check("WARN", "debug/advantage_std", measured, advice, drift))
    return out


def is_at_peak(run: Run) -> bool:
    """The last quarter's mean return is within 5% of the best window of a quarter of the points."""
    r = run.values("charts/episodic_return")
    r = r[np.isfinite(r)]
    if len(r) < 4:
        return False
    q = len(r) // 4
    c = np.cumsum(np.insert(r, 0, 0.0))
    best, end = float(np.max(c[q:] - c[:-q])) / q, float(np.mean(r[-q:]))
    return end >= best - 0.05 * abs(best)


def check_grad(run: Run, t: dict):
    tag = "debug/grad_norm"
    g = run.values(tag)
    g = g[np.isfinite(g)]
    if not len(g):
        return None
    limit = run.args.get("max_grad_norm")
    med = float(np.median(g))
    if not isinstance(limit, int | float) or limit <= 0:
        measured = f"median {fmt(med)}, max {fmt(float(np.max(g)))}"
        return Check("PASS", tag, measured, "not clipped (no --max-grad-norm)", med)
    frac, ratio = float(np.mean(g > limit)), med / limit
    measured = (
        f"above --max-grad-norm {fmt(limit)} on {frac:.0%} of updates, median {fmt(med)} ({fmt(ratio)}x)"
    )
    if ratio > t["grad_ratio_warn"]:
        advice = (
            "clipped hard on most updates: the clip, not --learning-rate, sets the step; check the reward "
            "scale and the value loss's size, or raise --max-grad-norm"
        )
        return Check("WARN", tag, measured, advice, ratio)
    if frac >= t["grad_clipped_every"]:
        note = f"clipped on every update: usual with CleanRL's --max-grad-norm {fmt(limit)} (the norm is pre-clip)"
        return Check("PASS", tag, measured, note, ratio)
    return Check("PASS", tag, measured, "clipped on some updates, as intended", ratio)


def check_finite(run: Run) -> list:
    out = []
    for tag, (steps, x) in sorted(run.scalars.items()):
        bad = ~np.isfinite(x)
        if bad.any() and tag not in MAY_BE_UNDEFINED:
            measured = f"{int(bad.sum())} non-finite values, the first at step {steps[bad][0]:,}"
            advice = "NaN or inf: diverged; lower --learning-rate, check the rewards and observations"
            out.append(Check("FAIL", tag, measured, advice, float(bad.sum())))
    if not out:
        count = sum(len(x) for _, x in run.scalars.values())
        measured = f"{len(run.scalars)} metrics, {count:,} values"
        out.append(Check("PASS", "all_metrics", measured, "every value finite", 0.0))
    return out


def check_status(run: Run):
    status = run.summary.get("status")
    tag = "summary/status"
    if status is None:
        return Check("WARN", tag, "no summary.json", "still running, or killed before it could write one")
    step = run.summary.get("global_step")
    measured = f"{status} at step {step:,}" if isinstance(step, int) else str(status)
    if status in ("finished", "already finished"):
        return Check("PASS", tag, measured, "the run completed its budget")
    if status in FAILED_STATUSES:
        advice = f"the run failed: {run.summary.get('error', status)}"
        if status == "non-finite loss":
            advice = (
                "a loss became NaN or inf (not logged); lower --learning-rate, check rewards and observations"
            )
        return Check("FAIL", tag, measured, advice)
    return Check("WARN", tag, measured, "stopped before the end of its budget (a signal); resume it")


def check_run(run: Run, t: dict = THRESHOLDS) -> list:
    """Every check whose metrics the run logged (REINFORCE has no KL, clipfrac or critic)."""
    checks = [check_status(run)]
    trend = "short"
    if "charts/episodic_return" in run.scalars:
        ret, trend = check_return(run, t)
        checks.append(ret)
    if "losses/approx_kl" in run.scalars:
        checks.append(check_kl(run, t))
    if "losses/clipfrac" in run.scalars:
        checks.append(check_clipfrac(run, t))
    if "debug/relative_entropy" in run.scalars:
        checks.append(check_entropy(run, t))
    if "losses/explained_variance" in run.scalars:
        checks.append(check_value(run, t))
    checks.extend(check_advantages(run, t, trend))
    if "debug/grad_norm" in run.scalars:
        checks.append(check_grad(run, t))
    checks.extend(check_finite(run))
    return [c for c in checks if c is not None]


# ------------------------------------------------ GROUPS --------------------------------------------------
def group_runs(runs: list, field: str) -> dict:
    """{label: [runs]}: by an args.json field, or one group per run without one."""
    if field is None:
        return {run.name: [run] for run in runs}
    groups = {}
    for run in runs:
        if field not in run.args:
            known = ", ".join(sorted(run.args)) or "none: no args.json"
            raise ReportError(
                f"--group-by {field}: not a field of {run.path}/args.json (its fields: {known})"
            )
        groups.setdefault(f"{field}={run.args[field]}", []).append(run)
    return groups


def group_summary(label: str, runs: list) -> dict:
    finals = np.array([run.final_return() for run in runs])
    finals = finals[np.isfinite(finals)]
    mean = float(np.mean(finals)) if len(finals) else float("nan")
    std = float(np.std(finals)) if len(finals) else float("nan")
    return {"group": label, "runs": len(runs), "final_return_mean": mean, "final_return_std": std}


# ------------------------------------------------ PLOTTING ------------------------------------------------
# The panels, in order: (title, tags drawn in it). A panel appears when the runs logged its first tag.
PANELS = [
    ("charts/episodic_return", ["charts/episodic_return", "charts/test_episodic_return"]),
    ("losses/approx_kl", ["losses/approx_kl"]),
    ("losses/clipfrac", ["losses/clipfrac"]),
    ("debug/relative_entropy", ["debug/relative_entropy"]),
    ("debug/residual_variance", ["debug/residual_variance"]),
    ("debug/advantage_mean", ["debug/advantage_mean", "debug/advantage_std"]),
    ("debug/grad_norm", ["debug/grad_norm"]),
    ("charts/learning_rate", ["charts/learning_rate"]),
    ("charts/SPS", ["charts/SPS"]),
]
# which check's verdict goes in each panel's title
PANEL_CHECKS = {
    "debug/residual_variance": ["losses/explained_variance"],
    "debug/advantage_mean": ["debug/advantage_mean", "debug/advantage_std"],
}
MAX_DRAWN = 2000  # points per curve in the PNG (a 10M-step Atari run logs ~9,800 per metric)
COLOURS = {"PASS": "tab:green", "WARN": "tab:orange", "FAIL": "tab:red"}


def panel_tags(runs: list) -> list:
    """The panels of PANELS whose first tag the runs logged, each with the tags they logged."""
    present = set().union(*(run.scalars for run in runs))
    return [(title, [t for t in tags if t in present]) for title, tags in PANELS if title in present]


def band_of(title: str, runs: list, t: dict):
    """(low, high) of the healthy band shaded in a panel, or None."""
    if title == "losses/approx_kl":
        return 0.0, t["kl_warn"]
    if title == "losses/clipfrac":
        return 0.0, t["clipfrac_warn"]
    if title == "debug/relative_entropy":
        return t["entropy_early_floor"], 1.0
    if title == "debug/residual_variance":
        return 0.0, 1.0 - t["ev_late"]
    if title == "debug/grad_norm":
        limits = [r.args.get("max_grad_norm") for r in runs]
        limits = [x for x in limits if isinstance(x, int | float) and x > 0]
        return (0.0, t["grad_ratio_warn"] * max(limits)) if limits else None
    return None


def smoothing(n: int) -> int:
    """The moving average's window for a curve of n points: 16 for 1,000, 50 for 10,000."""
    return max(1, round(math.sqrt(n) / 2))


def on_grid(runs: list, tag: str, grid: np.ndarray) -> np.ndarray:
    """Each run's smoothed curve interpolated onto grid; NaN outside the steps it logged."""
    rows = []
    for run in runs:
        if tag not in run.scalars:
            continue
        s, x = run.scalars[tag]
        ok = np.isfinite(x)
        s, x = s[ok], x[ok]
        if not len(x):
            continue
        y = smooth(x, smoothing(len(x)))
        row = np.interp(grid, s, y)
        row[(grid < s[0]) | (grid > s[-1])] = np.nan
        rows.append(row)
    return np.array(rows)


def build_figure(runs: list, checks: dict, groups: dict, t: dict = THRESHOLDS):
    """The report figure: one panel per metric logged, a curve (or a group's mean and spread) per group,
    the healthy band shaded and the verdict in each title. checks: {run.path: [Check]}."""
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global list of open figures

    panels = panel_tags(runs)
    ncols = 3 if len(panels) > 4 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.3 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.remove()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, tags) in zip(axes.flat, panels, strict=False):
        band = band_of(title, runs, t)
        if band is not None:
            ax.axhspan(*band, color="tab:green", alpha=0.08, lw=0, label="healthy band")
        for i, tag in enumerate(tags):
            for g, (label, members) in enumerate(groups.items()):
                colour = colours[(i * 3 + g) % len(colours)] if len(runs) == 1 else colours[g % len(colours)]
                if len(runs) == 1:  # one run: "raw" and "smoothed", or the tags' names when several
                    name = tag.split("/")[-1] if len(tags) > 1 else None
                else:
                    name = label if len(tags) == 1 else f"{label} {tag.split('/')[-1]}"
                draw_curves(ax, members, tag, "-" if i == 0 else "--", colour, name)
        decorate(ax, title, runs, t)
        verdict, count = panel_verdict(title, runs, checks)
        heading = {"debug/advantage_mean": "debug/advantage_mean and _std"}.get(title, title)
        ax.set_title(f"{heading}: {verdict}{count}", color=COLOURS.get(verdict, "k"), fontsize=10)
        ax.set_xlabel("global step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(tags) > 1 or (title == panels[0][0] and len(runs) > 1):
            ax.legend(fontsize=7, loc="best")
    counts = count_verdicts([c for cs in checks.values() for c in cs])
    name = runs[0].name if len(runs) == 1 else f"{len(runs)} runs in {len(groups)} groups"
    fig.suptitle(f"{name}: " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS), fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.92, wspace=0.25, hspace=0.45)
    return fig


def decorate(ax, title: str, runs: list, t: dict):
    """The reference lines and scales of particular panels."""
    if title == "losses/approx_kl":
        ax.axhline(t["kl_fail"], color="tab:red", ls=":", lw=1)
        if any(np.any(r.values(title) > 0) for r in runs):
            ax.set_yscale("log")  # healthy values span decades below the band's top
    if title == "debug/grad_norm":
        for limit in sorted({r.args.get("max_grad_norm") for r in runs} - {None}):
            ax.axhline(limit, color="k", ls=":", lw=1)
            where = dict(xycoords=("axes fraction", "data"), xytext=(0, 2), textcoords="offset points")
            ax.annotate(f"--max-grad-norm {limit}", (0.01, limit), fontsize=7, va="bottom", **where)
        ax.set_yscale("log")
    if title == "debug/advantage_mean" and len(runs) == 1 and "debug/advantage_std" in runs[0].scalars:
        s, sd = runs[0].scalars["debug/advantage_std"]  # healthy: |mean| within about one std of zero
        bound = t["adv_mean_ratio"] * smooth(sd, smoothing(len(sd)))
        ax.fill_between(s, -bound, bound, color="tab:green", alpha=0.08, lw=0)
    if title == "debug/residual_variance":
        ax.set_ylabel("1 - explained variance", fontsize=8)
        ax.axhline(1.0, color="k", ls=":", lw=1)
        finite = np.concatenate([r.values(title)[np.isfinite(r.values(title))] for r in runs])
        if len(finite):  # it oscillates wildly on CartPole: show the usual range, not the extremes
            ax.set_ylim(min(0.0, np.percentile(finite, 1)), max(1.2, min(np.percentile(finite, 95), 3.0)))


def draw_curves(ax, members: list, tag: str, style: str, colour, label: str):
    """One run: its raw points (faint) and their moving average. A group of runs: the mean of their
    smoothed curves and a band of one standard deviation (the min-max for two runs)."""
    present = [run for run in members if tag in run.scalars]
    if not present:
        return
    if len(members) == 1:
        s, x = present[0].scalars[tag]
        ok = np.isfinite(x)
        s, x = s[ok], x[ok]
        y = smooth(x, smoothing(len(x)))
        if len(x) > MAX_DRAWN:  # a long run: the raw points' min-max per bucket, which keeps every spike
            edges = np.linspace(0, len(x), MAX_DRAWN // 2 + 1).astype(int)
            lo, hi = np.minimum.reduceat(x, edges[:-1]), np.maximum.reduceat(x, edges[:-1])
            ax.fill_between(
                s[edges[:-1]], lo, hi, color=colour, alpha=0.25, lw=0, label=None if label else "raw"
            )
            keep = np.linspace(0, len(x) - 1, MAX_DRAWN).astype(int)
            s, y = s[keep], y[keep]
        else:
            ax.plot(s, x, color=colour, alpha=0.25, lw=0.7, label=None if label else "raw")
        ax.plot(s, y, style, color=colour, lw=1.4, label=label or "smoothed")
        return
    grid = np.linspace(0, max(run.scalars[tag][0][-1] for run in present), 400)
    rows = on_grid(present, tag, grid)
    if not len(rows):
        return
    with warnings.catch_warnings():  # grid points that no run reaches: "mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(rows, axis=0)
        if len(rows) == 2:
            lo, hi = np.nanmin(rows, axis=0), np.nanmax(rows, axis=0)
        else:
            sd = np.nanstd(rows, axis=0)
            lo, hi = mean - sd, mean + sd
    n = len(rows)
    ax.plot(grid, mean, style, color=colour, lw=1.4, label=f"{label} ({n} run{'s' * (n > 1)})")
    if n > 1:
        ax.fill_between(grid, lo, hi, color=colour, alpha=0.2, lw=0)


def panel_verdict(title: str, runs: list, checks: dict) -> tuple:
    """The worst verdict of the panel's checks over the runs, and ' (k/n runs)' when they differ."""
    names = PANEL_CHECKS.get(title, [title])
    verdicts = []
    for run in runs:
        mine = [c.verdict for c in checks[run.path] if c.metric in names]
        if mine:
            verdicts.append(max(mine, key=VERDICTS.index))
    if not verdicts:
        return "no check", ""
    worst = max(verdicts, key=VERDICTS.index)
    k = verdicts.count(worst)
    return worst, ("" if k == len(verdicts) == 1 else f" ({k}/{len(verdicts)} runs)")


# ------------------------------------------------ OUTPUT --------------------------------------------------
def count_verdicts(checks: list) -> dict:
    return {v: sum(c.verdict == v for c in checks) for v in VERDICTS}


def describe(run: Run) -> str:
    a, s = run.args, run.summary
    bits = [a.get("exp_name", "?"), a.get("env_id", s.get("env_id", "?")), f"seed {a.get('seed', '?')}"]
    if isinstance(s.get("global_step"), int):
        bits.append(f"{s['global_step']:,} steps")
    return f"run: {run.path}  ({', '.join(str(b) for b in bits)})"


def print_lines(runs, checks, summaries, png, counts):
    for run in runs:
        print(describe(run))
        width = max(len(c.metric) for c in checks[run.path])
        for c in checks[run.path]:
            print(f"{c.verdict}  {c.metric:<{width}}  {c.measured}  {c.advice}")
    for g in summaries:
        mean, std = g["final_return_mean"], g["final_return_std"]
        print(f"GROUP  {g['group']}  final return {fmt(mean)} ± {fmt(std)} over {g['runs']} seed(s)")
    if png:
        print(f"report: {png}")
    print(", ".join(f"{counts[v]} {v}" for v in VERDICTS) + f" ({len(runs)} run{'s' * (len(runs) > 1)})")


def finite_or_none(x):
    """NaN and inf as null, so that the JSON is standard (Python's json writes NaN by default)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    return x


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Is this run healthy? A verdict per metric and a PNG of the curves, from run directories.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or folders of them)")
    parser.add_argument(
        "--out", help="the PNG to write (default: RUN_DIR/report.png for one run, else ./report.png)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the lines")
    parser.add_argument(
        "--group-by", metavar="FIELD", help="an args.json field that groups runs, e.g. network"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = load_runs(args.run_dirs)
        groups = group_runs(runs, args.group_by)
    except (ReportError, OSError) as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 2
    checks = {run.path: check_run(run) for run in runs}
    summaries = [group_summary(label, members) for label, members in groups.items()]
    if len(runs) == 1 and args.group_by is None:
        summaries = []
    out = args.out or (os.path.join(runs[0].path, "report.png") if len(runs) == 1 else "report.png")
    try:
        fig = build_figure(runs, checks, groups)
        fig.savefig(out, dpi=100)
    except ImportError as e:
        print(
            f"report.py: no PNG written, matplotlib is missing ({e}): pip install -e '.[dev]'",
            file=sys.stderr,
        )
        out = None
    except OSError as e:
        print(f"report.py: cannot write {out} ({e})", file=sys.stderr)
        return 2
    all_checks = [c for cs in checks.values() for c in cs]
    counts = count_verdicts(all_checks)
    if args.json:
        result = {
            "runs": [
                {
                    "run_dir": run.path,
                    "env_id": run.args.get("env_id", run.summary.get("env_id")),
                    "exp_name": run.args.get("exp_name"),
                    "seed": run.args.get("seed"),
                    "status": run.summary.get("status"),
                    "final_return": run.final_return(),
                    "checks": [asdict(c) for c in checks[run.path]],
                }
                for run in runs
            ],
            "groups": summaries,
            "png": out,
            "counts": counts,
        }
        print(json.dumps(finite_or_none(result)))
    else:
        print_lines(runs, checks, summaries, out, counts)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
