"""Helpers for the benchmark scripts (not for the top-level scripts, which share no code)."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.conftest import read_scalars  # noqa: E402  (reads TensorBoard event files)


def pin_to_current_core() -> int:
    """This thread, and every thread it starts later (envpool's workers), on the core it runs on now: what
    the scripts' --pin-cpu does (they ask glibc's sched_getcpu(); field 39 of /proc/thread-self/stat, see
    proc(5), is the same core)."""
    with open("/proc/thread-self/stat") as f:
        core = int(f.read().rsplit(")", 1)[1].split()[36])
    os.sched_setaffinity(0, {core})
    return core


def run_script(script, run_dir, *flags):
    """Run a top-level script as a user would; return its JSON summary (the last line of stdout)."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, script),
        "--run-dir",
        run_dir,
        "--no-progress",
        *map(str, flags),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def return_curve(run_path, grid):
    """The run's charts/episodic_return interpolated onto `grid` (environment steps)."""
    steps, returns = np.array(read_scalars(run_path)["charts/episodic_return"]).T
    return np.interp(grid, steps, returns)


def plot_bands(ax, grid, curves, color, label):
    """Mean across seeds, a band of one standard deviation, and a faint min-max range."""
    curves = np.asarray(curves)
    mean, std = curves.mean(0), curves.std(0)
    ax.plot(grid, mean, color=color, label=label)
    ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.25)
    ax.fill_between(grid, curves.min(0), curves.max(0), color=color, alpha=0.08)


def style_axis(ax, title):
    ax.set_title(title)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episodic return")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)


def save_results(fig, result, name):
    """Write benchmarks/<name>.png and benchmarks/<name>.json, and print the JSON."""
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "benchmarks", f"{name}.png"), dpi=110)
    with open(os.path.join(ROOT, "benchmarks", f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
