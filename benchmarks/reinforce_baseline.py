"""What the baseline buys: reinforce.py against reinforce_baseline.py, 5 seeds each, same budget.

    python benchmarks/reinforce_baseline.py            # the README's plot and table (about 15 minutes on 2 cores)

For each environment (CartPole-v1, InvertedPendulum-v4), script and seed it runs the script as a user would
(one process at a time), reads `charts/episodic_return` from its TensorBoard events, interpolates every
curve onto a common grid of steps, and plots the mean and the spread (one standard deviation across seeds,
and the min-max range) against environment steps. Writes benchmarks/reinforce_baseline.png and
benchmarks/reinforce_baseline.json (final returns per seed, and the mean across-seed standard deviation
of the curves: the variance the baseline is meant to remove).
"""

import argparse
import os
import platform
import sys

import numpy as np
from common import ROOT, plot_bands, return_curve, run_script, save_results, style_axis

SCRIPTS = ["reinforce.py", "reinforce_baseline.py"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument(
        "--envs",
        nargs="+",
        default=["CartPole-v1:300000", "InvertedPendulum-v4:300000"],
        help="ENV_ID:TOTAL_TIMESTEPS",
    )
    args = parser.parse_args()
    run_dir = os.path.join(ROOT, "runs", "benchmark_reinforce")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.envs), figsize=(6 * len(args.envs), 4.2))
    axes = np.atleast_1d(axes)
    result = {
        "command": "python benchmarks/reinforce_baseline.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "envs": {},
    }
    for ax, spec in zip(axes, args.envs, strict=True):
        env_id, budget = spec.split(":")
        budget = int(budget)
        grid = np.linspace(budget / 50, budget, 50)
        result["envs"][env_id] = {"total_timesteps": budget}
        for script, color in zip(SCRIPTS, ["tab:red", "tab:blue"], strict=True):
            curves, finals = [], []
            for seed in args.seeds:
                summary = run_script(
                    script, run_dir, "--env-id", env_id, "--seed", seed, "--total-timesteps", budget
                )
                curves.append(return_curve(summary["run_dir"], grid))
                finals.append(summary["episodic_return_mean_last100"])
                print(f"{env_id} {script} seed {seed}: {finals[-1]:.1f} ({summary['sps']} SPS)", flush=True)
            curves = np.array(curves)
            std = curves.std(0)
            plot_bands(ax, grid, curves, color, f"{script[:-3]} (mean of {len(args.seeds)} seeds)")
            result["envs"][env_id][script] = {
                "final_return_last100_per_seed": finals,
                "final_mean": float(np.mean(finals)),
                "final_std": float(np.std(finals)),
                "curve_std_across_seeds_mean": float(std.mean()),
            }
        style_axis(ax, f"{env_id}, {len(args.seeds)} seeds (band: 1 std; faint: min-max)")
    save_results(fig, result, "reinforce_baseline")


if __name__ == "__main__":
    main()
