"""Shared helpers for the tests: CPU only, one torch thread, every run written under pytest's tmp_path."""

import json
import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every metric of the schema in CONVENTIONS.md that a discrete-action PPO script logs.
PPO_METRICS = [
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "charts/learning_rate",
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/old_approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "debug/relative_entropy",
    "debug/residual_variance",
    "debug/advantage_mean",
    "debug/advantage_std",
    "debug/grad_norm",
]


def run_cli(script, *args, cwd=None, env=None, timeout=300):
    """Run a top-level script as a user would; returns the CompletedProcess (text mode)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=full_env, timeout=timeout)


def last_json(stdout: str) -> dict:
    """The JSON summary that every script prints as its last stdout line."""
    return json.loads(stdout.strip().splitlines()[-1])


def read_scalars(run_dir: str) -> dict:
    """{tag: [(step, value), ...]} from every TensorBoard event file of a run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents"):
            acc = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "runs")


# The smallest budget for each script that reaches at least two updates on CartPole-v1.
SMALL = {
    "ppo.py": dict(total_timesteps=256, num_envs=4, num_steps=32),
    "reinforce.py": dict(total_timesteps=256, num_envs=4, batch_size=64),
    "reinforce_baseline.py": dict(total_timesteps=256, num_envs=4, batch_size=64),
}


def load_script(script):
    """Import a top-level script as a module (importing does no work)."""
    import importlib

    return importlib.import_module(script[: -len(".py")])


def small_args(script, run_dir, **overrides):
    module = load_script(script)
    return module.Args(**{**SMALL[script], "run_dir": run_dir, "progress": False, **overrides})
