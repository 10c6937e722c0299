"""The PPO paper's study of objectives (its Table 1) with ppo_objectives.py, scored beside the paper's.

    python benchmarks/objectives.py                # the reduced size (docs/results.md): about 1 h on 2 cores
    python benchmarks/objectives.py --size paper   # the paper's: 7 tasks, 1M steps, 3 seeds (about 50 h here)
    python benchmarks/objectives.py --envs Hopper-v4 --seeds 1 --total-timesteps 20000 --name try

A setting is a set of flags to `python ppo_objectives.py`: the paper's 11 (Table 1), then pg and the GAE
lambdas 0 and 1 with clip (0.95 is clip-0.2). Each run trains as a user would, `--jobs` at a time (default:
one per core); a finished run in runs/benchmark_objectives whose args.json is exactly the one this run would
have is read instead of retrained (the runs are deterministic), so an interrupted benchmark continues where
it stopped. (It cannot tell which code made a run: after changing ppo_objectives.py, delete that directory.)

As in the paper: a run scores the mean return of its last 100 episodes; scores are normalised per task so
that uniformly random actions score 0 (measured here: the first 100 episodes of one environment on the
training backend) and the best of the paper's settings that ran scores 1 (its mean over seeds; pg and the
lambdas may score above 1); a setting's score is the mean over its runs (tasks x seeds). Its 95% interval is
a stratified bootstrap over runs (the runs of each task resampled with replacement, as rliable does; the
normalisation held fixed): with 3 seeds a task it has few distinct resamples, so read it as a rough guide. Writes benchmarks/NAME.json (top-level "scores", and the returns of
every run) and benchmarks/NAME.png (learning curves per task), and prints the table beside the paper's.
"""

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import numpy as np
from common import ROOT, return_curve, run_script, save_results, style_axis

SETTINGS = {  # name: flags of ppo_objectives.py (everything else its defaults: CleanRL's, not the paper's)
    **{f"clip-{e}": ["--objective", "clip", "--clip-coef", e] for e in ("0.1", "0.2", "0.3")},
    "unclipped": ["--objective", "unclipped"],
    **{
        f"adaptive-kl-{d}": ["--objective", "adaptive-kl", "--kl-dtarg", d] for d in ("0.003", "0.01", "0.03")
    },
    **{f"kl-{b}": ["--objective", "kl", "--kl-coef", b] for b in ("0.3", "1", "3", "10")},
    "pg": ["--objective", "pg"],
    **{f"clip-lambda-{lam}": ["--objective", "clip", "--gae-lambda", lam] for lam in ("0", "1")},
}
PAPER = {  # Table 1 of Schulman et al. 2017 (7 MuJoCo v1 tasks, 1M steps, 3 seeds, 21 runs per setting)
    "unclipped": -0.39,
    "clip-0.1": 0.76,
    "clip-0.2": 0.82,
    "clip-0.3": 0.70,
    "adaptive-kl-0.003": 0.68,
    "adaptive-kl-0.01": 0.74,
    "adaptive-kl-0.03": 0.71,
    "kl-0.3": 0.62,
    "kl-1": 0.71,
    "kl-3": 0.72,
    "kl-10": 0.69,
}
PAPER_TASKS = ["HalfCheetah-v4", "Hopper-v4", "InvertedDoublePendulum-v4", "InvertedPendulum-v4"]
PAPER_TASKS += ["Reacher-v4", "Swimmer-v4", "Walker2d-v4"]
SIZES = {
    # One task of each kind the paper has, locomotion with early termination (Hopper: 4 of its 7 tasks are
    # locomotion) and balance (InvertedDoublePendulum; 2 of 7, with Reacher's reaching close to it), where
    # 120k steps (57 updates) already separate the objectives: an objective that lets the policy run away
    # does so within tens of updates. The paper's 3 seeds: the 42 runs take about an hour here, two at once.
    "reduced": dict(
        envs=["Hopper-v4", "InvertedDoublePendulum-v4"],
        seeds=[1, 2, 3],
        total_timesteps=120_000,
        settings=[
            "clip-0.2",
            "unclipped",
            "kl-1",
            "adaptive-kl-0.01",
            "pg",
            "clip-lambda-0",
            "clip-lambda-1",
        ],
    ),
    "paper": dict(envs=PAPER_TASKS, seeds=[1, 2, 3], total_timesteps=1_000_000, settings=list(SETTINGS)),
}
RUN_DIR = os.path.join(ROOT, "runs", "benchmark_objectives")


def random_return(env_id, episodes=100, seed=0):
    """Mean return of the first `episodes` episodes of uniformly random actions in one environment, on the
    backend training uses (one environment: the first to end among several would favour short episodes)."""
    import ppo_objectives

    envs = ppo_objectives.make_env(env_id, 1, seed)
    envs.reset()
    space, rng = envs.single_action_space, np.random.default_rng(seed)
    returns, running = [], 0.0
    while len(returns) < episodes:
        action = rng.uniform(space.low, space.high, (1,) + space.shape).astype(np.float32)
        _, reward, terminated, truncated, _ = envs.step(action)
        running += float(reward[0])  # (the autoreset step after an end adds its reward 0 to the next one)
        if terminated[0] or truncated[0]:
            returns.append(running)
            running = 0.0
    envs.close()
    return float(np.mean(returns))


def intended_args(env_id, setting, seed, total_timesteps):
    """The flags of one run, and the arguments (as args.json stores them) that ppo_objectives.py makes of them."""
    import ppo_objectives

    flags = ["--env-id", env_id, "--seed", seed, "--total-timesteps", total_timesteps]
    flags += ["--exp-name", f"obj-{setting}", "--torch-threads", 1, *SETTINGS[setting]]
    parsed = ppo_objectives.parse_args([str(f) for f in flags])
    return flags, {f.name: getattr(parsed, f.name) for f in fields(parsed) if f.init}


def finished_run(env_id, setting, seed, total_timesteps):
    """The summary of a finished run in RUN_DIR whose args.json is exactly this run's, or None. (It does
    not know the code that made it: after changing ppo_objectives.py, delete RUN_DIR.)"""
    if not os.path.isdir(RUN_DIR):
        return None
    _, wanted = intended_args(env_id, setting, seed, total_timesteps)
    where = ("run_dir", "progress")  # (the benchmark sets these itself)
    for name in sorted(os.listdir(RUN_DIR), reverse=True):  # the newest first
        path = os.path.join(RUN_DIR, name)
        if not name.startswith(f"{env_id}__obj-{setting}__{seed}__"):
            continue
        if not os.path.exists(os.path.join(path, "summary.json")):
            continue
        summary, stored = (json.load(open(os.path.join(path, f))) for f in ("summary.json", "args.json"))
        same = {k: v for k, v in stored.items() if k not in where} == {
            k: v for k, v in wanted.items() if k not in where
        }
        if summary["status"] == "finished" and same:
            return summary
    return None


def train(job, total_timesteps):
    env_id, setting, seed = job
    summary = finished_run(env_id, setting, seed, total_timesteps)
    reused = summary is not None
    if not reused:
        summary = run_script("ppo_objectives.py", RUN_DIR, *intended_args(*job, total_timesteps)[0])
    how = "reused" if reused else f"{summary['sps']} SPS"
    print(
        f"{env_id} {setting} seed {seed}: {summary['episodic_return_mean_last100']:.1f} ({how})", flush=True
    )
    return summary


def stratified_bootstrap(per_task, reps=10_000, seed=0):
    """95% percentile interval of the mean over all runs, the runs of each task resampled with replacement."""
    rng = np.random.default_rng(seed)
    samples = [x[rng.integers(0, len(x), (reps, len(x)))] for x in map(np.asarray, per_task)]
    means = np.concatenate(samples, axis=1).mean(axis=1)
    return [float(q) for q in np.percentile(means, [2.5, 97.5])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="reduced")
    parser.add_argument("--envs", nargs="+", help="tasks (default: the size's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the size's)")
    parser.add_argument("--total-timesteps", type=int, help="steps per run (default: the size's)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="(default: the size's)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at once (default: one a core)")
    parser.add_argument("--name", default="objectives", help="write benchmarks/NAME.json and NAME.png")
    args = parser.parse_args()
    size = {k: getattr(args, k) or v for k, v in SIZES[args.size].items()}
    envs, seeds, total, settings = size["envs"], size["seeds"], size["total_timesteps"], size["settings"]
    sys.path.insert(0, ROOT)
    start = time.time()
    # every setting on a task before the next seed, so that a stopped benchmark leaves comparable runs behind
    jobs = [(e, s, seed) for seed in seeds for e in envs for s in settings]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        summaries = dict(zip(jobs, pool.map(lambda job: train(job, total), jobs), strict=True))
    wall = time.time() - start
    randoms = {e: random_return(e) for e in envs}

    returns = {e: {s: {seed: summaries[e, s, seed]["episodic_return_mean_last100"] for seed in seeds}
                   for s in settings} for e in envs}  # fmt: skip
    # 1 = the best of the paper's settings that ran (as in the paper; pg and the lambdas may score above 1)
    pool = [s for s in settings if s in PAPER] or settings
    best = {e: max(pool, key=lambda s: np.mean(list(returns[e][s].values()))) for e in envs}
    top = {e: float(np.mean(list(returns[e][best[e]].values()))) for e in envs}
    scored = [e for e in envs if top[e] > randoms[e]]  # (where no setting beat random, no scale exists)
    for e in set(envs) - set(scored):
        print(f"warning: no setting beat random actions on {e}: it is left out of the scores", flush=True)
    normalised = {  # setting: [per task: [per seed]]
        s: [[(returns[e][s][seed] - randoms[e]) / (top[e] - randoms[e]) for seed in seeds] for e in scored]
        for s in settings
    }
    scores = {s: float(np.mean(normalised[s])) if scored else None for s in settings}
    ci95 = {s: stratified_bootstrap(normalised[s]) if scored else None for s in settings}

    print(
        f"\n{'setting':<20}{'score':>7}  {'95% CI':<16}{'paper':>7}   " + "  ".join(f"{e:>26}" for e in envs)
    )
    for s in settings:
        paper = f"{PAPER[s]:>7.2f}" if s in PAPER else f"{'-':>7}"
        per_task = "  ".join(f"{np.mean(list(returns[e][s].values())):>26.1f}" for e in envs)
        score = (
            f"{scores[s]:>7.2f}  [{ci95[s][0]:5.2f}, {ci95[s][1]:5.2f}]" if scored else f"{'-':>7}  {'':14}"
        )
        print(f"{s:<20}{score}  {paper}   {per_task}")
    print(
        f"{'random actions':<20}{0.0:>7.2f}  {'':<16}{0.0:>7.2f}   "
        + "  ".join(f"{randoms[e]:>26.1f}" for e in envs)
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4.5), squeeze=False)
    grid = np.linspace(total / 50, total, 50)
    colors = plt.get_cmap("tab20" if len(settings) > 10 else "tab10").colors
    for ax, e in zip(axes[0], envs, strict=True):
        for s, color in zip(settings, colors, strict=False):
            curves = np.array([return_curve(summaries[e, s, seed]["run_dir"], grid) for seed in seeds])
            ax.plot(grid, curves.mean(0), color=color, label=s)
            ax.fill_between(grid, curves.min(0), curves.max(0), color=color, alpha=0.1)
        ax.axhline(randoms[e], color="gray", ls=":", label="random actions")
        style_axis(ax, f"{e}, mean of {len(seeds)} seeds (faint: min-max)")
        ax.legend(loc="upper left", fontsize=7)
    result = {
        "command": "python benchmarks/objectives.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "size": args.size,
        "envs": envs,
        "seeds": seeds,
        "total_timesteps": total,
        "jobs": args.jobs,
        "wall_seconds": round(wall),  # (of this invocation: reused runs cost nothing)
        "train_seconds": round(sum(s["wall_seconds"] for s in summaries.values())),
        "scores": scores,
        "ci95": ci95,  # (with 2 or 3 seeds a task, the bootstrap has few distinct resamples: a rough guide)
        "normalised": {s: dict(zip(scored, normalised[s], strict=True)) for s in settings},
        "paper": {s: PAPER.get(s) for s in settings},
        "returns": returns,
        "random_return": randoms,
        "best": {e: {"setting": best[e], "return": top[e]} for e in envs},
        "flags": {s: SETTINGS[s] for s in settings},
        "sps": {e: {s: [summaries[e, s, seed]["sps"] for seed in seeds] for s in settings} for e in envs},
    }
    save_results(fig, result, args.name)


if __name__ == "__main__":
    main()
