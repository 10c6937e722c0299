"""CartPole-v1 benchmark of ppo.py: learning (3 seeds x 500k steps) and speed against the env-only ceiling.

    python benchmarks/cartpole.py                 # the README's numbers
    python benchmarks/cartpole.py --seeds 1 --total-timesteps 100000   # a quick look

For each seed it runs `python ppo.py --seed S --total-timesteps N` as a user would (one process each, one
after another, so the timings do not compete), reads the JSON summary line, then measures the ceiling:
the same envpool environments (4 x CartPole-v1) stepped with random actions and no learning. Prints a
table and writes it as JSON next to this file (cartpole_results.json).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_only_sps(num_envs: int, steps: int = 50_000) -> float:
    """Steps per second of the environments alone: random actions, no network, no learning."""
    sys.path.insert(0, ROOT)
    import ppo

    envs = ppo.make_env("CartPole-v1", num_envs, seed=0)
    envs.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, size=(steps, num_envs))
    start = time.perf_counter()
    for a in actions:
        envs.step(a)
    return steps * num_envs / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--total-timesteps", type=int, default=500_000)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for ppo.py")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "ppo.py"),
            "--seed",
            str(seed),
            "--total-timesteps",
            str(args.total_timesteps),
            "--run-dir",
            os.path.join(ROOT, "runs", "benchmarks"),
            "--no-progress",
            *args.extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(summary)
        print(
            f"seed {seed}: return(last100) {summary['episodic_return_mean_last100']:.1f}  SPS {summary['sps']}",
            flush=True,
        )
    ceiling = env_only_sps(num_envs=4)
    returns = [r["episodic_return_mean_last100"] for r in rows]
    sps = [r["sps"] for r in rows]
    result = {
        "command": "python benchmarks/cartpole.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "total_timesteps": args.total_timesteps,
        "per_seed": [
            {
                "seed": r["seed"],
                "return_last100": r["episodic_return_mean_last100"],
                "sps": r["sps"],
                "wall_seconds": r["wall_seconds"],
            }
            for r in rows
        ],
        "return_last100_mean": float(np.mean(returns)),
        "return_last100_std": float(np.std(returns)),
        "train_sps_mean": float(np.mean(sps)),
        "env_only_sps": round(ceiling),
    }
    print(
        f"\nreturn(last100) {result['return_last100_mean']:.1f} +- {result['return_last100_std']:.1f} over "
        f"{len(rows)} seeds; training SPS {result['train_sps_mean']:.0f}; env-only SPS {ceiling:.0f} "
        f"(training reaches {100 * result['train_sps_mean'] / ceiling:.0f}% of the ceiling)"
    )
    with open(os.path.join(ROOT, "benchmarks", "cartpole_results.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
