"""ppo_continuous.py on MuJoCo: HalfCheetah-v4, Hopper-v4, Walker2d-v4, 1M steps; 3 seeds, Hopper 10.

    python benchmarks/mujoco.py                      # the README's table and plot (about 2 h on 2 cores)
    python benchmarks/mujoco.py --envs Hopper-v4 --seeds 1 --total-timesteps 200000

Runs `python ppo_continuous.py --env-id ENV --seed S --total-timesteps N` as a user would, `--jobs` at a
time (the runs are deterministic, so running two at once changes their speed, not their returns; measure
SPS with one run alone). Writes benchmarks/mujoco.json (the mean of the last 100 episode returns per run)
and benchmarks/mujoco.png (mean and spread of the return curves).
"""

import argparse
import json
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import ROOT, plot_bands, return_curve, run_script, save_results, style_axis

CLEANRL_V4 = {"HalfCheetah-v4": 1443, "Hopper-v4": 2383, "Walker2d-v4": 2288}  # published, for reference


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", nargs="+", default=list(CLEANRL_V4))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    # Hopper's spread across seeds is the widest of the three: 3 seeds cannot place it against CleanRL's figure
    parser.add_argument("--hopper-seeds", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--name", default="mujoco", help="write benchmarks/NAME.json and NAME.png")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: read the finished runs already in runs/benchmark_mujoco",
    )
    args = parser.parse_args()
    run_dir = os.path.join(ROOT, "runs", "benchmark_mujoco")
    jobs = [(e, seed) for e in args.envs for seed in (args.hopper_seeds if e == "Hopper-v4" else args.seeds)]
    jobs.sort(key=lambda job: job[0] != "Hopper-v4")  # Hopper first

    def one(job):
        env_id, seed = job
        summary = run_script(
            "ppo_continuous.py",
            run_dir,
            "--env-id",
            env_id,
            "--seed",
            seed,
            "--total-timesteps",
            args.total_timesteps,
        )
        print(
            f"{env_id} seed {seed}: {summary['episodic_return_mean_last100']:.1f} ({summary['sps']} SPS)",
            flush=True,
        )
        return summary

    def finished(job):
        """The summary of the newest finished run of this (env, seed, budget) in run_dir."""
        env_id, seed = job
        found = []
        for name in sorted(os.listdir(run_dir)):
            path = os.path.join(run_dir, name, "summary.json")
            if name.startswith(f"{env_id}__ppo_continuous__{seed}__") and os.path.exists(path):
                summary = json.load(open(path))
                budget = json.load(open(os.path.join(run_dir, name, "args.json")))["total_timesteps"]
                if summary["status"] == "finished" and budget == args.total_timesteps:
                    found.append(summary)
        if not found:
            raise SystemExit(f"--collect: no finished run of {env_id} seed {seed} in {run_dir}")
        return found[-1]

    if args.collect:
        summaries = [finished(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            summaries = list(pool.map(one, jobs))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.envs), figsize=(5.5 * len(args.envs), 4))
    axes = np.atleast_1d(axes)
    grid = np.linspace(args.total_timesteps / 50, args.total_timesteps, 50)
    result = {
        "command": "python benchmarks/mujoco.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "total_timesteps": args.total_timesteps,
        "jobs": args.jobs,
        "envs": {},
    }
    for ax, env_id in zip(axes, args.envs, strict=True):
        runs = [s for s in summaries if s["env_id"] == env_id]
        finals = [s["episodic_return_mean_last100"] for s in runs]
        result["envs"][env_id] = {
            "per_seed": {s["seed"]: s["episodic_return_mean_last100"] for s in runs},
            "sps_per_seed": {s["seed"]: s["sps"] for s in runs},
            "mean": float(np.mean(finals)),
            "std": float(np.std(finals)),
            "cleanrl_v4": CLEANRL_V4.get(env_id),
        }
        plot_bands(
            ax,
            grid,
            [return_curve(s["run_dir"], grid) for s in runs],
            "tab:blue",
            f"ppo_continuous ({len(runs)} seeds)",
        )
        if env_id in CLEANRL_V4:
            ax.axhline(CLEANRL_V4[env_id], color="gray", ls="--", label="CleanRL v4 (published, final)")
        style_axis(ax, env_id)
    save_results(fig, result, args.name)


if __name__ == "__main__":
    main()
