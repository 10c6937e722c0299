"""ppo_procgen_impala.py on bigfish (easy): the IMPALA CNN against the Nature CNN, seeds 1 and 2 each.

    python benchmarks/procgen_networks.py                    # the README's plot: CPU configuration, 200k steps
    python benchmarks/procgen_networks.py --total-timesteps 25000000 --flags=""   # the paper's setting (a GPU's budget)

Runs `python ppo_procgen_impala.py --env-id ENV --network NET --seed S --total-timesteps N FLAGS` as a user
would, `--jobs` at a time. The default FLAGS are the CPU configuration of the README (16 envs x 128 steps,
4 minibatches: 8x more updates per environment step than the paper's 64 x 256, for budgets a CPU can
afford). Writes benchmarks/procgen_networks.json (per run: mean of the last 100 training and test episodes, SPS) and
benchmarks/procgen_networks.png (training and test-level return, both networks).
"""

import argparse
import os
import platform
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import ROOT, plot_bands, read_scalars, run_script, save_results, style_axis

CPU_FLAGS = "--num-envs 16 --num-steps 128 --num-minibatches 4 --torch-threads 1"


def curve(run_path, tag, grid):
    steps, returns = np.array(read_scalars(run_path)[tag]).T
    return np.interp(grid, steps, returns)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env-id", default="bigfish")
    parser.add_argument("--networks", nargs="+", default=["impala", "nature"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--total-timesteps", type=int, default=200_000)
    parser.add_argument("--flags", default=CPU_FLAGS, help="more flags for every run, one string")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    run_dir = os.path.join(ROOT, "runs", "benchmark_procgen")
    jobs = [(network, seed) for network in args.networks for seed in args.seeds]

    def one(job):
        network, seed = job
        summary = run_script(
            "ppo_procgen_impala.py",
            run_dir,
            "--env-id",
            args.env_id,
            "--network",
            network,
            "--seed",
            seed,
            "--total-timesteps",
            args.total_timesteps,
            "--exp-name",
            f"ppo_procgen_{network}",
            *shlex.split(args.flags),
        )
        summary["network"] = network
        print(
            f"{network} seed {seed}: train {summary['episodic_return_mean_last100']:.2f}, "
            f"test {summary['test_episodic_return_mean_last100']:.2f} ({summary['sps']} SPS)",
            flush=True,
        )
        return summary

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        summaries = list(pool.map(one, jobs))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    grid = np.linspace(args.total_timesteps / 40, args.total_timesteps, 40)
    result = {
        "command": "python benchmarks/procgen_networks.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "env_id": args.env_id,
        "flags": args.flags,
        "total_timesteps": args.total_timesteps,
        "jobs": args.jobs,
        "runs": {},
    }
    for network, color in zip(args.networks, ["tab:blue", "tab:orange"], strict=False):
        runs = [s for s in summaries if s["network"] == network]
        for ax, tag, what in (
            (axes[0], "charts/episodic_return", "training levels"),
            (axes[1], "charts/test_episodic_return", "test levels (every level)"),
        ):
            plot_bands(
                ax,
                grid,
                [curve(s["run_dir"], tag, grid) for s in runs],
                color,
                f"{network} ({len(runs)} seeds)",
            )
            style_axis(ax, f"{args.env_id} (easy), {what}")
        result["runs"][network] = {
            s["seed"]: {
                "train_last100": s["episodic_return_mean_last100"],
                "test_last100": s["test_episodic_return_mean_last100"],
                "sps": s["sps"],
            }
            for s in runs
        }
    save_results(fig, result, "procgen_networks")


if __name__ == "__main__":
    main()
