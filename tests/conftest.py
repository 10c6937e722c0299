"""Shared helpers for the tests: CPU only, one torch thread, every run written under pytest's tmp_path."""

import json
import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every metric of the schema in docs/conventions.md that a discrete-action PPO script logs.
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


def wait_for_an_iteration(proc):
    """Read a running script's stdout up to its first progress line ("step N ..."), printed when the first
    iteration has been logged: a signal sent after it finds the training loop running, however slowly a
    loaded machine got there (no sleep to guess). Needs the progress lines (no --no-progress)."""
    for line in proc.stdout:
        if line.startswith("step "):
            return
    raise AssertionError(f"the run ended before its first iteration: {proc.stderr.read()}")


@pytest.fixture
def cli_here(monkeypatch, capsys):
    """run_cli's result from the script's cli() in this process, as `python script.py ARGS` runs it, for the
    runs that stop at an error before training (a fresh Python process and torch's import cost seconds each):
    without pinning and on one torch thread, as this process runs every later test."""

    def run(script, *args):
        argv = [script, "--no-pin-cpu", "--torch-threads", "1", *map(str, args)]
        monkeypatch.setattr(sys, "argv", argv)
        code = load_script(script).cli()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return run


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


# The longest tests, longest first (measured with `pytest --durations`), run at the start of the suite rather
# than at its end, where one of them could keep one xdist worker busy long after the other has run out of
# tests. (xdist hands out consecutive chunks: the first worker takes these while the second takes the next.)
SLOW_FIRST = [
    "test_ppo_atari.py::test_probes_pass",
    "test_ppo_procgen_impala.py::test_probes_pass",
    "test_ppo_continuous.py::test_inverted_pendulum_learns",
    "test_reinforce.py::test_probes_pass",
    "test_ppo_continuous.py::test_probes_pass",
    "test_ppo_atari_multigpu.py::test_two_ranks_hold_identical_weights_and_gather_every_episode",
    "test_ppo.py::test_probes_pass",
    "test_ppo_objectives.py::test_policy_probes_pass_on_adaptive_kl",
    "test_ppo.py::test_cartpole_learns",
    "test_reinforce.py::test_cartpole_learns",
]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = f"{item.path.name}::{item.originalname}"
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "runs")


@pytest.fixture(autouse=True)
def cores_unchanged():
    """A test that runs a script's main() in the pytest process with --pin-cpu would leave the process, and
    every process later tests start, on one core (the probe runs would then share it): fail that test."""
    if not hasattr(os, "sched_getaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    yield
    assert os.sched_getaffinity(0) == before, "the test pinned the pytest process (pass pin_cpu=False)"


# The smallest budget for each script that reaches at least two updates on its default environment.
SMALL = {
    "ppo.py": dict(total_timesteps=256, num_envs=4, num_steps=32),
    "reinforce.py": dict(total_timesteps=256, num_envs=4, batch_size=64),
    "reinforce_baseline.py": dict(total_timesteps=256, num_envs=4, batch_size=64),
    "ppo_continuous.py": dict(total_timesteps=256, num_envs=2, num_steps=64, num_minibatches=4),
    # on adaptive-kl, the objective that keeps state of its own (beta, in the checkpoint): its default, clip,
    # is ppo_continuous.py's to the bit (tests/test_ppo_objectives.py)
    "ppo_objectives.py": dict(
        total_timesteps=256, num_envs=2, num_steps=64, num_minibatches=4, objective="adaptive-kl"
    ),
    "ppo_atari.py": dict(total_timesteps=256, num_envs=2, num_steps=64),
    # the Nature CNN here: these runs test conventions, and the IMPALA CNN costs ~8x more on a CPU
    # (tests/test_ppo_procgen_impala.py runs both networks)
    "ppo_procgen_impala.py": dict(
        total_timesteps=256, num_envs=2, num_steps=64, num_test_envs=2, network="nature"
    ),
}
# Budget and flags for the tests that run a script from the shell on its default environment: the image
# scripts cost ~10x more per step (the Procgen script's default batch alone is 16,384 steps of the IMPALA CNN),
# so they run two small iterations.
CLI_STEPS = {s: 4096 for s in SMALL}
CLI_FLAGS = {s: [] for s in SMALL}
CLI_STEPS["ppo_atari.py"] = 1024
CLI_FLAGS["ppo_atari.py"] = ["--num-steps", "64"]
CLI_FLAGS["ppo_objectives.py"] = ["--objective", "adaptive-kl"]
CLI_STEPS["ppo_procgen_impala.py"] = 1024
CLI_FLAGS["ppo_procgen_impala.py"] = ["--num-envs", "8", "--num-steps", "64", "--network", "nature"]
CLI_FLAGS["ppo_procgen_impala.py"] += ["--num-test-envs", "2"]
# Each script's default environment, and the test environments that fit its action space.
DEFAULT_ENV = {
    "ppo.py": "CartPole-v1",
    "reinforce.py": "CartPole-v1",
    "reinforce_baseline.py": "CartPole-v1",
    "ppo_continuous.py": "HalfCheetah-v4",
    "ppo_objectives.py": "HalfCheetah-v4",
    "ppo_atari.py": "BreakoutNoFrameskip-v4",
    "ppo_procgen_impala.py": "bigfish",
}
COUNTING = {s: "tests.envs:Counting{}-v0" for s in SMALL}
COUNTING["ppo_continuous.py"] = COUNTING["ppo_objectives.py"] = "tests.envs:Counting{}Continuous-v0"
COUNTING["ppo_atari.py"] = "tests.envs:Counting{}Atari-v0"
COUNTING["ppo_procgen_impala.py"] = "tests.envs:Counting{}Procgen-v0"


def named_args(fn, args, kwargs) -> dict:
    """The arguments of a call to fn by parameter name, however the call passed them (for spies)."""
    import inspect

    return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)


def load_script(script):
    """Import a top-level script as a module (importing does no work)."""
    import importlib

    return importlib.import_module(script[: -len(".py")])


def small_args(script, run_dir, **overrides):
    module = load_script(script)
    defaults = {
        **SMALL.get(script, {}),  # (a script outside SMALL: the test gives its sizes)
        "run_dir": run_dir,
        "progress": False,
        "torch_threads": 1,
        # these runs share the pytest process: pinning it would hold every later test, and every process
        # they start, to one core (test_conventions.py tests --pin-cpu in processes of its own)
        "pin_cpu": False,
    }  # 1 thread in tests
    return module.Args(**{**defaults, **overrides})


SUMMARY_KEYS = (
    "env_id",
    "seed",
    "global_step",
    "episodes",
    "episodic_return_mean_last100",
    "sps",
    "wall_seconds",
    "status",
)


def check_run_outputs(summary: dict, checkpoint: bool = False):
    """A finished run's directory holds args.json, summary.json equal to the printed summary with every key
    of docs/conventions.md, TensorBoard events, the checkpoint if asked for, and no half-written temporary file."""
    path = summary["run_dir"]
    files = os.listdir(path)
    for name in ("args.json", "summary.json") + (("checkpoint.pt",) if checkpoint else ()):
        assert name in files, name
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert not [f for f in files if f.endswith(".tmp")]
    assert json.load(open(os.path.join(path, "summary.json"))) == summary
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    assert not missing, missing


def action_zero(self, x):
    """An Agent.get_action that always takes action 0 (with its log-prob and value as usual), for runs that
    must collect the same data whatever their random streams."""
    action = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    _, logprob, _, value = self.get_action_and_value(x, action)
    return action, logprob, value
