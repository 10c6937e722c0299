"""Probe environments: tiny tasks that each isolate one capability of an RL agent, and a runner that trains
every script on the probes that fit it and checks the learned values and policies.

From Andy Jones, "Debugging RL, Without the Agonizing Pain" (https://andyljones.com/posts/rl-debugging.html).
When a script does not learn, run the probes first: the first probe that fails names the broken part.

| probe | actions | observation        | reward                          | episode | checks                      |
|-------|---------|--------------------|---------------------------------|---------|-----------------------------|
| 1     | 1       | 0                  | +1                              | 1 step  | the value network can fit   |
| 2     | 1       | -1 or +1 at random | = observation                   | 1 step  | values depend on the input  |
| 3     | 1       | 0, then 1          | 0, then +1                      | 2 steps | discounting (V(0) = gamma)  |
| 4     | 2       | 0                  | +1 for action 1, -1 for 0       | 1 step  | the policy gradient         |
| 5     | 2       | -1 or +1 at random | +1 if action == (obs > 0)       | 1 step  | policy depends on the input |

Each probe comes in the observation shapes the scripts use (ids registered at import, so any script runs on
them with `--env-id probe_envs:<Id>`):
- `Probe{k}-v0`: vector observations, shape (1,), float32, discrete actions (ppo.py, reinforce*.py);
- `Probe{k}Continuous-v0`: vector observations, one unbounded continuous action (Gaussian policies). In
  probes 4 and 5 the reward is 1 - (a - a*)^2 with target a* = +0.5 (probe 4) or obs / 2 (probe 5), so a
  Gaussian policy N(mu, sigma) gets exactly 1 - sigma^2 - (mu - a*)^2 on average. (With bounds, clipping
  would move the best mean away from a* while sigma is large; clipping is tested elsewhere.)
- `Probe{k}Atari-v0`: (4, 84, 84) uint8 frames, discrete actions (ppo_atari.py);
- `Probe{k}Procgen-v0`: (64, 64, 3) uint8 images, discrete actions (ppo_procgen_impala.py).
An image encodes the scalar observation s in every pixel: s = -1, 0, +1 become 0, 128, 255.

Runner:  python probe_envs.py                      # every script that exists, on its probes
         python probe_envs.py --scripts ppo.py     # only ppo.py
It trains each (script, probe) pair with `--save-model`, loads the checkpoint, compares V(s) and pi(a|s)
with the expected numbers below within the stated tolerances, prints one table, and exits 1 on any failure.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

SHAPES = {"vector": (1,), "atari": (4, 84, 84), "procgen": (64, 64, 3)}
CONTINUOUS_TARGET = 0.5  # a* of continuous probe 4; probe 5 uses obs * CONTINUOUS_TARGET


class ProbeEnv(gym.Env):
    """One of the five probes, in one observation format ("vector", "atari", "procgen"), with discrete or
    continuous actions. Episodes end by termination only (no time limit)."""

    metadata = {"render_modes": []}

    def __init__(self, probe: int, obs_format: str = "vector", continuous: bool = False):
        assert probe in (1, 2, 3, 4, 5) and obs_format in SHAPES
        self.probe, self.obs_format, self.continuous = probe, obs_format, continuous
        if obs_format == "vector":
            self.observation_space = gym.spaces.Box(-1.0, 1.0, SHAPES["vector"], np.float32)
        else:
            self.observation_space = gym.spaces.Box(0, 255, SHAPES[obs_format], np.uint8)
        if continuous:
            self.action_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
        else:
            self.action_space = gym.spaces.Discrete(2 if probe >= 4 else 1)
        self._s, self._t = 0.0, 0

    def encode(self, s: float) -> np.ndarray:
        """The observation of scalar state s in this env's format."""
        if self.obs_format == "vector":
            return np.array([s], dtype=np.float32)
        return np.full(SHAPES[self.obs_format], int(round((s + 1.0) * 127.5)), dtype=np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._s = float(self.np_random.choice([-1.0, 1.0])) if self.probe in (2, 5) else 0.0
        return self.encode(self._s), {}

    def step(self, action):
        s, a = self._s, action
        if self.probe == 1:
            reward, terminated = 1.0, True
        elif self.probe == 2:
            reward, terminated = s, True
        elif self.probe == 3:
            self._t += 1
            reward, terminated = (1.0, True) if self._t == 2 else (0.0, False)
            self._s = 1.0
        elif self.continuous:  # probes 4 and 5, continuous: quadratic reward around the target action
            a = float(np.asarray(a).reshape(-1)[0])
            reward, terminated = 1.0 - (a - self.best_action(s)) ** 2, True
        else:  # probes 4 and 5, discrete
            reward, terminated = (1.0 if int(a) == self.best_action(s) else -1.0), True
        return self.encode(self._s), float(reward), terminated, False, {}

    # ---- the expected solution, next to the dynamics it comes from ----
    def states(self):
        """The scalar states an episode can visit."""
        return {1: [0.0], 2: [-1.0, 1.0], 3: [0.0, 1.0], 4: [0.0], 5: [-1.0, 1.0]}[self.probe]

    def best_action(self, s: float):
        """The optimal action in state s (None when the action does not matter)."""
        if self.probe < 4:
            return None
        if self.continuous:
            return CONTINUOUS_TARGET if self.probe == 4 else CONTINUOUS_TARGET * s
        return 1 if self.probe == 4 else int(s > 0)

    def expected_value(self, s: float, gamma: float) -> float:
        """V*(s): the value of state s under the optimal policy, discounted by gamma."""
        if self.probe == 1:
            return 1.0
        if self.probe == 2:
            return s
        if self.probe == 3:
            return gamma if s == 0.0 else 1.0
        return 1.0


PROBE_IDS = []
for _k in (1, 2, 3, 4, 5):
    for _suffix, _kwargs in (
        ("", {}),
        ("Continuous", {"continuous": True}),
        ("Atari", {"obs_format": "atari"}),
        ("Procgen", {"obs_format": "procgen"}),
    ):
        _id = f"Probe{_k}{_suffix}-v0"
        PROBE_IDS.append(_id)
        if _id not in gym.registry:
            gym.register(_id, entry_point=ProbeEnv, kwargs={"probe": _k, **_kwargs})


# ---------------------------------------------------------------------------------------------------------
# RUNNER
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ScriptProbes:
    """Which probes a script is checked on ({family suffix: probe numbers}; the suffix is "", "Continuous",
    "Atari" or "Procgen"), the training budget, whether the script learns a value function, and how many
    torchrun processes (ranks) train it (1: plain python)."""

    families: dict
    flags: list
    has_value: bool = True
    probe_flags: dict = field(default_factory=dict)
    ranks: int = 1


# Probe 3 runs with gamma = 0.5 so that the discount is visible: V(first state) = 0.5 against V(second) = 1.
# (With the default 0.99 a value function that ignores discounting would pass.)
PROBE3_FLAGS = ["--gamma", "0.5"]
ALL = (1, 2, 3, 4, 5)
SCRIPTS = {
    "ppo.py": ScriptProbes(
        {"": ALL}, ["--total-timesteps", "16384", "--learning-rate", "1e-3"], probe_flags={3: PROBE3_FLAGS}
    ),
    # REINFORCE learns no value function: only the probes that test the policy (4 and 5) apply.
    "reinforce.py": ScriptProbes(
        {"": (4, 5), "Continuous": (4, 5)},
        ["--total-timesteps", "32768", "--batch-size", "256"],
        has_value=False,
    ),
    "reinforce_baseline.py": ScriptProbes(
        {"": ALL, "Continuous": ALL},
        ["--total-timesteps", "32768", "--batch-size", "256"],
        probe_flags={3: PROBE3_FLAGS},
    ),
    # Without reward scaling, so that values come out in the probe's own units (with it, V is in units of
    # the return's running std, and probe 1's constant return has no spread at all to scale by).
    "ppo_continuous.py": ScriptProbes(
        {"Continuous": ALL}, ["--total-timesteps", "16384", "--no-norm-reward"], probe_flags={3: PROBE3_FLAGS}
    ),
    # ppo_continuous.py's budget, on the adaptive KL penalty (its default objective, clip, is ppo_continuous.py's
    # to the bit: tests/test_ppo_objectives.py)
    "ppo_objectives.py": ScriptProbes(
        {"Continuous": ALL},
        ["--total-timesteps", "16384", "--no-norm-reward", "--objective", "adaptive-kl"],
        probe_flags={3: PROBE3_FLAGS},
    ),
    "ppo_atari.py": ScriptProbes(
        {"Atari": ALL},
        ["--total-timesteps", "8192", "--num-envs", "8", "--num-steps", "32", "--learning-rate", "1e-3"],
        probe_flags={3: PROBE3_FLAGS},
    ),
    # The same budget and sizes as ppo_atari.py, in two gloo processes of 4 envs each.
    "ppo_atari_multigpu.py": ScriptProbes(
        {"Atari": ALL},
        ["--total-timesteps", "8192", "--num-envs", "8", "--num-steps", "32", "--learning-rate", "1e-3"],
        probe_flags={3: PROBE3_FLAGS},
        ranks=2,
    ),
    "ppo_procgen_impala.py": ScriptProbes(
        {"Procgen": ALL},
        [
            "--total-timesteps",
            "4096",
            "--num-envs",
            "8",
            "--num-steps",
            "16",
            "--num-test-envs",
            "0",
            "--no-norm-reward",
        ],
        probe_flags={3: PROBE3_FLAGS},
    ),
}
VALUE_TOL = 0.1  # |V(s) - expected| for every state
POLICY_TOL = 0.05  # discrete: pi(best action | s) >= 1 - POLICY_TOL
MEAN_TOL = 0.1  # continuous: |mean action - best action|


def train(script: str, env_id: str, flags: list, run_dir: str, seed: int) -> dict:
    """Train one script on one probe; return its JSON summary (the last line of its stdout)."""
    ranks = SCRIPTS[script].ranks
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    )
    cmd = [
        sys.executable,
        *launcher,
        script,
        "--env-id",
        f"probe_envs:{env_id}",
        "--seed",
        str(seed),
        "--save-model",
        "--run-dir",
        run_dir,
        "--exp-name",
        "probe",
        "--no-progress",
        "--torch-threads",
        "1",
        *(["--no-cuda"] if ranks > 1 else []),  # ranks as gloo processes: one GPU would not hold two
        *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if ranks > 1 else None  # (torchrun warns without it)
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=here, env=env)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        tail = errors[-1:] or (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{script} {env_id} ... exited {proc.returncode}: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_agent(script: str, checkpoint: str):
    """Build the script's Agent from its own source (importing a script does no work) and load the weights."""
    import torch

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    spec = importlib.util.spec_from_file_location(f"probe_target_{script[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)  # a checkpoint is data, never code
    env = gym.make(f"probe_envs:{ckpt['args']['env_id'].split(':')[-1]}")
    agent = module.Agent(env.observation_space, env.action_space)
    agent.load_state_dict(ckpt["agent"])
    return agent.eval(), env.unwrapped, ckpt["args"]


def check(script: str, spec: ScriptProbes, agent, env: ProbeEnv, gamma: float) -> list:
    """Rows (check, expected, got, tolerance, ok) comparing the trained agent with the probe's solution."""
    import torch

    rows = []
    for s in env.states():
        x = torch.as_tensor(env.encode(s))[None]
        with torch.no_grad():
            if spec.has_value:
                want = env.expected_value(s, gamma)
                if env.continuous and env.best_action(s) is not None:
                    # under a Gaussian policy N(mu, sigma) the expected reward is 1 - sigma^2 - (mu - a*)^2
                    mu, sigma = agent.greedy_action(x)[0, 0].item(), agent.actor_logstd.exp()[0, 0].item()
                    want = 1.0 - sigma**2 - (mu - env.best_action(s)) ** 2
                got = agent.get_value(x).item()
                rows.append((f"V(s={s:+.0f})", want, got, VALUE_TOL, abs(got - want) <= VALUE_TOL))
            best = env.best_action(s)
            if best is None:
                continue
            if env.continuous:
                mu = agent.greedy_action(x)[
                    0, 0
                ].item()  # the Gaussian's mean (normalising inputs if the agent does)
                rows.append((f"mean a(s={s:+.0f})", best, mu, MEAN_TOL, abs(mu - best) <= MEAN_TOL))
            else:
                if hasattr(agent, "get_action_and_value"):  # PPO agents
                    logprob = agent.get_action_and_value(x, torch.tensor([best]))[1]
                else:  # REINFORCE agents
                    logprob = agent.get_logprob_and_entropy(x, torch.tensor([best]))[0]
                p = logprob.exp().item()
                rows.append((f"pi(a={best}|s={s:+.0f})", 1.0, p, POLICY_TOL, p >= 1.0 - POLICY_TOL))
    return rows


def run_one(script: str, env_id: str, probe: int, run_dir: str, seed: int):
    spec = SCRIPTS[script]
    try:
        summary = train(script, env_id, spec.flags + spec.probe_flags.get(probe, []), run_dir, seed)
        agent, env, args = load_agent(script, os.path.join(summary["run_dir"], "checkpoint.pt"))
        return script, env_id, check(script, spec, agent, env, args["gamma"]), None
    except Exception as e:  # reported in the table as a failed row, never swallowed
        return script, env_id, [], f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train each script on its probe environments and check the results."
    )
    parser.add_argument(
        "--scripts", nargs="+", default=None, help="scripts to check (default: every one that exists)"
    )
    parser.add_argument(
        "--probes", nargs="+", type=int, default=None, help="probe numbers (default: all that fit)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="training runs at once")
    parser.add_argument(
        "--keep", metavar="DIR", default=None, help="keep the runs in DIR instead of a temp dir"
    )
    args = parser.parse_args(argv)

    here = os.path.dirname(os.path.abspath(__file__))
    scripts = args.scripts or [s for s in SCRIPTS if os.path.exists(os.path.join(here, s))]
    unknown = [s for s in scripts if s not in SCRIPTS or not os.path.exists(os.path.join(here, s))]
    if unknown:
        print(
            f"error: no probe set for {', '.join(unknown)} (known and present: "
            f"{', '.join(s for s in SCRIPTS if os.path.exists(os.path.join(here, s)))})",
            file=sys.stderr,
        )
        return 2
    jobs = [
        (s, f"Probe{p}{suffix}-v0", p)
        for s in scripts
        for suffix, probes in SCRIPTS[s].families.items()
        for p in probes
        if args.probes is None or p in args.probes
    ]
    fitting = sorted({p for s in scripts for probes in SCRIPTS[s].families.values() for p in probes})
    unrun = sorted(set(args.probes or []) - set(fitting))
    if unrun or not jobs:  # a probe asked for and never checked is no pass
        asked = ", ".join(map(str, unrun or args.probes))
        print(f"error: probe {asked} fits none of {', '.join(scripts)} (they run {fitting})", file=sys.stderr)
        return 2
    run_dir = args.keep or tempfile.mkdtemp(prefix="probes-")
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda job: run_one(*job, run_dir, args.seed), jobs))
    finally:
        if args.keep is None:
            shutil.rmtree(run_dir, ignore_errors=True)

    passed = failures = 0
    print(f"{'script':<24}{'probe':<22}{'check':<18}{'expected':>10}{'got':>10}{'tol':>7}  result")
    for script, env_id, rows, error in results:
        if error:
            failures += 1
            print(f"{script:<24}{env_id:<22}{'run':<18}{'':>10}{'':>10}{'':>7}  FAIL {error}")
        for name, want, got, tol, ok in rows:
            passed, failures = passed + ok, failures + (not ok)
            print(
                f"{script:<24}{env_id:<22}{name:<18}{want:>10.3f}{got:>10.3f}{tol:>7.2f}  {'ok' if ok else 'FAIL'}"
            )
    print(f"probes: {passed} passed, {failures} failed")
    return 1 if failures or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
