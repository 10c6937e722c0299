"""ppo_atari.py on Breakout: the learning curve for the budget this machine allows, against random play.

    python benchmarks/atari.py --total-timesteps 1000000 --seeds 1 --torch-threads 1   # the README's curve
    python benchmarks/atari.py --plot-only runs/benchmark_atari                        # re-plot finished runs

Runs `python ppo_atari.py --env-id ENV --seed S --total-timesteps N --torch-threads T` as a user would, one
after another, measures random play with the same protocol (whole games, raw score), and writes
benchmarks/atari.json (per-seed mean of the last 100 games, SPS) and benchmarks/atari.png.
"""

import argparse
import json
import os
import platform
import sys

import numpy as np
from common import ROOT, plot_bands, return_curve, run_script, save_results, style_axis

CLEANRL_10M = {"BreakoutNoFrameskip-v4": 415}  # ppo_atari_envpool.py, 10M steps, published


def random_play(env_id, games, seed=0):
    """Mean raw score of `games` whole games of uniformly random actions, with the training protocol."""
    import ppo_atari

    envs = ppo_atari.make_env(env_id, 8, seed)
    envs.reset()
    rng = np.random.default_rng(seed)
    scores, running = [], np.zeros(envs.num_envs)
    while len(scores) < games:
        action = rng.integers(0, envs.single_action_space.n, envs.num_envs)
        _, reward, terminated, truncated, info = envs.step(action)
        raw_reward, game_over = ppo_atari.game_score(envs, reward, terminated, truncated, info)
        running += raw_reward
        scores.extend(running[game_over].tolist())
        running[game_over] = 0.0
    envs.close()
    return float(np.mean(scores[:games]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env-id", default="BreakoutNoFrameskip-v4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument(
        "--plot-only", metavar="DIR", help="plot the finished runs in DIR instead of training"
    )
    args = parser.parse_args()
    sys.path.insert(0, ROOT)

    if args.plot_only:
        summaries = []
        for name in sorted(os.listdir(args.plot_only)):
            path = os.path.join(args.plot_only, name, "summary.json")
            if os.path.exists(path):
                summaries.append(json.load(open(path)))
    else:
        summaries = []
        for seed in args.seeds:
            summary = run_script(
                "ppo_atari.py",
                os.path.join(ROOT, "runs", "benchmark_atari"),
                "--env-id",
                args.env_id,
                "--seed",
                seed,
                "--total-timesteps",
                args.total_timesteps,
                "--torch-threads",
                args.torch_threads,
            )
            print(
                f"seed {seed}: {summary['episodic_return_mean_last100']:.1f} ({summary['sps']} SPS)",
                flush=True,
            )
            summaries.append(summary)
    env_id = summaries[0]["env_id"]
    total = min(s["global_step"] for s in summaries)
    random_score = random_play(env_id, games=50)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(total / 50, total, 50)
    plot_bands(
        ax,
        grid,
        [return_curve(s["run_dir"], grid) for s in summaries],
        "tab:blue",
        f"ppo_atari ({len(summaries)} seed(s))",
    )
    ax.axhline(random_score, color="gray", ls=":", label=f"random play ({random_score:.1f})")
    style_axis(ax, f"{env_id} (whole games, raw score)")
    result = {
        "command": "python benchmarks/atari.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "env_id": env_id,
        "total_timesteps": total,
        "per_seed": {s["seed"]: s["episodic_return_mean_last100"] for s in summaries},
        "sps": {s["seed"]: s["sps"] for s in summaries},
        "random_play_50_games": random_score,
        "cleanrl_10m_published": CLEANRL_10M.get(env_id),
    }
    save_results(fig, result, "atari")


if __name__ == "__main__":
    main()
