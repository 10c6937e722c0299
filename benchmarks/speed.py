"""Speed of every script: training SPS against the SPS of stepping the same environments with random actions
and no learning (the ceiling), on the CPU or, with --cuda, on a GPU.

    python benchmarks/speed.py                         # every script, CPU, default settings (about 10 min)
    python benchmarks/speed.py --scripts ppo.py ppo_atari.py
    python benchmarks/speed.py --compile               # also each PPO script with --compile
    python benchmarks/speed.py --cuda --compile --cudagraphs

Training SPS is the script's own `sps` (environment steps per second after start-up, summed over envs) from
`python SCRIPT --total-timesteps N --no-progress`, run as a user would, one run at a time. The ceiling builds
the script's environments with its own `make_env` and its default number of envs (on one core when the
script's default is --pin-cpu), and steps them with uniformly random actions. Prints a table and writes
benchmarks/speed.json (or --out).
"""

import argparse
import importlib
import json
import os
import platform
import sys
import time

import numpy as np
from common import ROOT, pin_to_current_core, run_script

# script: (environment steps of the training run: a few iterations of the default batch, extra flags)
BUDGETS = {
    "ppo.py": (100_000, []),
    "reinforce.py": (100_000, []),
    "reinforce_baseline.py": (100_000, []),
    "ppo_continuous.py": (40_960, []),
    "ppo_atari.py": (10_240, []),
    "ppo_procgen_impala.py": (16_384, []),  # one iteration of the default batch
}


def steady_sps(run_path):
    """SPS between the end of the first iteration and the end of the run, from the wall times TensorBoard
    stores with each point: without start-up and without --compile's compilation, which happens during the
    first iteration (and a second time in GAE on the first call)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for name in os.listdir(run_path):
        if name.startswith("events.out.tfevents"):
            acc = EventAccumulator(os.path.join(run_path, name), size_guidance={"scalars": 0})
            acc.Reload()
            points += [(e.step, e.wall_time) for e in acc.Scalars("charts/SPS")]
    points.sort()
    if len(points) < 3:
        return None
    (step0, time0), (step1, time1) = points[1], points[-1]
    return int((step1 - step0) / (time1 - time0))


PPO_SCRIPTS = ("ppo.py", "ppo_continuous.py", "ppo_atari.py", "ppo_procgen_impala.py")


def env_only_sps(script, seconds=10.0, seed=1):
    """Steps per second of the script's environments (its make_env, its default env and number of envs)
    under uniformly random actions."""
    sys.path.insert(0, ROOT)
    module = importlib.import_module(script[: -len(".py")])
    defaults = module.Args(total_timesteps=10**9)
    previous_cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if defaults.pin_cpu:  # on one core if the script's training runs there by default (--pin-cpu)
        pin_to_current_core()
    envs = module.make_env(defaults.env_id, defaults.num_envs, seed)
    space = envs.single_action_space
    rng = np.random.default_rng(seed)

    def random_actions():
        if hasattr(space, "n"):
            return rng.integers(0, space.n, envs.num_envs)
        return rng.uniform(space.low, space.high, (envs.num_envs, *space.shape)).astype(space.dtype)

    envs.reset()
    for _ in range(10):  # warm-up
        envs.step(random_actions())
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        envs.step(random_actions())
        steps += envs.num_envs
    sps = steps / (time.perf_counter() - start)
    envs.close()
    if previous_cores is not None:
        os.sched_setaffinity(0, previous_cores)
    return defaults.env_id, int(sps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scripts", nargs="+", default=list(BUDGETS))
    parser.add_argument("--cuda", action="store_true", help="train on the GPU (default: --no-cuda)")
    parser.add_argument("--compile", action="store_true", help="also run each PPO script with --compile")
    parser.add_argument(
        "--cudagraphs", action="store_true", help="also run each PPO script with --cudagraphs"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every training budget")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "speed.json"))
    args = parser.parse_args()
    device_flag = "--cuda" if args.cuda else "--no-cuda"
    run_dir = os.path.join(ROOT, "runs", "benchmark_speed")

    rows = []
    for script in args.scripts:
        env_id, ceiling = env_only_sps(script)
        variants = [[]]
        if script in PPO_SCRIPTS:
            variants += [["--compile"]] * args.compile + [["--cudagraphs"]] * args.cudagraphs
            if args.compile and args.cudagraphs:
                variants.append(["--compile", "--cudagraphs"])
        budget, flags = BUDGETS[script]
        for variant in variants:
            steps = int(budget * args.scale)
            summary = run_script(script, run_dir, "--total-timesteps", steps, device_flag, *flags, *variant)
            row = {
                "script": script,
                "env": env_id,
                "device": "cuda" if args.cuda else "cpu",
                "options": " ".join(variant) or "-",
                "training_sps": summary["sps"],
                "steady_sps": steady_sps(summary["run_dir"]),
                "env_only_sps": ceiling,
                "ratio": round(summary["sps"] / ceiling, 3),
                "steps": summary["global_step"],
            }
            rows.append(row)
            print(
                f"{script:24s} {env_id:24s} {row['device']:5s} {row['options']:22s} "
                f"{row['training_sps']:>8,} {row['steady_sps'] or 0:>8,} {ceiling:>9,} {row['ratio']:6.3f}",
                flush=True,
            )
    import torch

    result = {
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.cuda and torch.cuda.is_available() else ""),
        "rows": rows,
    }
    print(
        "\n| script | env | device | options | training SPS | after the first iteration | env-only SPS | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        steady = f"{r['steady_sps']:,}" if r["steady_sps"] else "-"
        print(
            f"| `{r['script']}` | {r['env']} | {r['device']} | {r['options']} | {r['training_sps']:,} | {steady} | "
            f"{r['env_only_sps']:,} | {r['ratio']:.2f} |"
        )
    # a run of some scripts updates their rows in an existing file and keeps the others
    if os.path.exists(args.out):
        key = lambda r: (r["script"], r["device"], r["options"])  # noqa: E731
        new = {key(r) for r in rows}
        old = json.load(open(args.out))
        result["rows"] = [r for r in old["rows"] if key(r) not in new] + rows
        result["command"] = old["command"] + " ; " + result["command"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
