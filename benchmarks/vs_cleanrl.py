"""This project's PPO scripts against CleanRL's, side by side on this machine: training SPS and final returns.

    python benchmarks/vs_cleanrl.py            # 3 workloads x 3 pairs (about 15 min on 2 cores)
    python benchmarks/vs_cleanrl.py --quick    # one short pair each (about 2 min), prints, writes no JSON

Three workloads, each script at its defaults (both sides use the same hyperparameters there) but for the
budget: ppo.py against CleanRL's ppo.py on CartPole-v1, ppo_continuous.py against ppo_continuous_action.py
on HalfCheetah-v4, ppo_atari.py against ppo_atari_envpool.py on BreakoutNoFrameskip-v4 (envpool's Breakout-v5
with the same protocol). CleanRL 1.2.0, its last release on PyPI, is installed as a package in a venv of its
own on first use (--venv; nothing of it enters this repository): it declares Python < 3.11 and pins packages
that do not install on 3.11, so its wheel goes in with --no-deps beside what these three scripts import
(gym 0.23.1 and envpool 0.8.4 for ppo.py and ppo_atari_envpool.py, gymnasium 0.28.1 and mujoco 2.3.3 for
ppo_continuous_action.py, pygame for gym's CartPole module).

A pair is one run of each side, one after the other, on the same core (taskset) with one torch thread
(OMP_NUM_THREADS=1 for CleanRL, --torch-threads 1 here), alternating A B A B A B, so that the machine's drift
reaches both. SPS is what each script reports itself (environment steps over the time since its training
loop started; CleanRL's last "SPS:" line), and steps/s over the whole command's wall time beside it. The
ratio is taken pair by pair, and its median reported. Returns: this project's summary mean of the last 100
episodes, CleanRL's mean of the last 100 episodic returns it printed (Atari: whole games, as here). Writes
benchmarks/vs_cleanrl.json.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import ROOT

CLEANRL = "1.2.0"
PACKAGES = ["gym==0.23.1", "gymnasium==0.28.1", "mujoco==2.3.3", "envpool==0.8.4", "pygame"]
PACKAGES += ["tensorboard", "numpy<2", "imageio<3"]
# name: (our script, CleanRL's module, its --env-id, steps of a full run's pair, of --quick's)
WORKLOADS = {
    "CartPole-v1": ("ppo.py", "cleanrl.ppo", "CartPole-v1", 200_000, 50_000),
    "HalfCheetah-v4": (
        "ppo_continuous.py",
        "cleanrl.ppo_continuous_action",
        "HalfCheetah-v4",
        61_440,
        10_240,
    ),
    "BreakoutNoFrameskip-v4": ("ppo_atari.py", "cleanrl.ppo_atari_envpool", "Breakout-v5", 20_480, 4_096),
}


def ensure_venv(venv):
    """CleanRL's venv, made on first use; its python."""
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(python):
        return python
    print(f"installing CleanRL {CLEANRL} into {venv} (once)", flush=True)
    pip = [os.path.join(venv, "bin", "pip"), "install", "-q"]
    steps = [
        [sys.executable, "-m", "venv", venv],
        pip + ["torch==2.13.0"],  # the CPU build on this project's machines, as .ci/run installs
        [os.path.join(venv, "bin", "pip"), "download", "-q", f"cleanrl=={CLEANRL}", "--no-deps"]
        + ["--ignore-requires-python", "-d", os.path.join(venv, "wheels")],
    ]
    for cmd in steps:
        subprocess.run(cmd, check=True)
    wheel = next(f for f in os.listdir(os.path.join(venv, "wheels")) if f.startswith("cleanrl-"))
    subprocess.run(
        pip + ["--no-deps", "--ignore-requires-python", os.path.join(venv, "wheels", wheel)], check=True
    )
    subprocess.run(pip + PACKAGES, check=True)
    return python


def timed(cmd, cwd, env=None):
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout, time.time() - start


def ours(script, env_id, steps, seed, core, workdir):
    cmd = ["taskset", "-c", str(core), sys.executable, os.path.join(ROOT, script), "--env-id", env_id]
    cmd += ["--seed", str(seed), "--total-timesteps", str(steps), "--torch-threads", "1", "--no-progress"]
    cmd += ["--run-dir", os.path.join(workdir, "runs")]
    out, wall = timed(cmd, workdir)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "finished", summary
    return dict(sps=summary["sps"], wall_sps=round(steps / wall), ret=summary["episodic_return_mean_last100"])


def cleanrl(python, module, env_id, steps, seed, core, workdir):
    cmd = ["taskset", "-c", str(core), python, "-m", module, "--env-id", env_id, "--seed", str(seed)]
    cmd += ["--total-timesteps", str(steps), "--cuda", "False"]
    out, wall = timed(cmd, workdir, env={"OMP_NUM_THREADS": "1"})
    sps = [int(x) for x in re.findall(r"^SPS: (\d+)", out, re.M)]
    returns = [float(x) for x in re.findall(r"episodic_return=\[?([-\d.e+]+)", out)]
    return dict(
        sps=sps[-1], wall_sps=round(steps / wall), ret=float(np.mean(returns[-100:])) if returns else None
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short pair per workload; no JSON")
    parser.add_argument("--pairs", type=int, default=3, help="A B pairs per workload (full run)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), f"cleanrl-{CLEANRL}-venv"))
    parser.add_argument("--core", type=int, default=os.cpu_count() - 1, help="the core both sides run on")
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    pairs = 1 if args.quick else args.pairs
    results, start = {}, time.time()
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.workloads:
            script, module, cleanrl_id, full, quick = WORKLOADS[name]
            steps = quick if args.quick else full
            runs = {"ours": [], "cleanrl": []}
            for seed in range(1, pairs + 1):  # A B, A B, ...: a new seed each pair
                runs["ours"].append(ours(script, name, steps, seed, args.core, workdir))
                runs["cleanrl"].append(cleanrl(python, module, cleanrl_id, steps, seed, args.core, workdir))
                a, b = runs["ours"][-1], runs["cleanrl"][-1]
                print(f"{name} seed {seed}: {script} {a['sps']} SPS, CleanRL {b['sps']} SPS", flush=True)
            ratios = [a["sps"] / b["sps"] for a, b in zip(runs["ours"], runs["cleanrl"], strict=True)]
            results[name] = {
                "steps": steps,
                "ours": script,
                "cleanrl": module,
                "runs": runs,
                "ratios": [round(r, 2) for r in ratios],
                "median_ratio": round(float(np.median(ratios)), 2),
            }
    print(
        f"\n{'workload':<24}{'ours SPS':>18}{'CleanRL SPS':>18}{'ratio':>8}{'ours return':>14}{'CleanRL':>10}"
    )
    for name, r in results.items():
        sps = {k: "/".join(str(x["sps"]) for x in r["runs"][k]) for k in ("ours", "cleanrl")}
        ret = {
            k: np.mean([x["ret"] for x in r["runs"][k] if x["ret"] is not None]) for k in ("ours", "cleanrl")
        }
        print(f"{name:<24}{sps['ours']:>18}{sps['cleanrl']:>18}{r['median_ratio']:>7.2f}x"
              f"{ret['ours']:>14.1f}{ret['cleanrl']:>10.1f}")  # fmt: skip
    if args.quick:
        return
    result = {
        "command": "python benchmarks/vs_cleanrl.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "cleanrl": CLEANRL,
        "core": args.core,
        "wall_seconds": round(time.time() - start),
        "workloads": results,
    }
    with open(os.path.join(ROOT, "benchmarks", "vs_cleanrl.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v["median_ratio"] for k, v in results.items()}))


if __name__ == "__main__":
    main()
