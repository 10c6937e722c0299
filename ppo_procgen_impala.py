"""PPO on Procgen with the IMPALA CNN: ppo_atari.py plus Procgen's games, a deeper network, and a test
of generalisation to unseen levels.

Adds over ppo_atari.py (`diff ppo_atari.py ppo_procgen_impala.py` shows exactly this):
- the 16 Procgen games (Cobbe et al. 2020) from the `procgen` module, stepped in C++: procedurally generated
  levels, 64x64 RGB frames, 15 actions. Training uses `--num-levels` levels from `--start-level` on (0: every
  level); `--distribution-mode easy|hard`. Procgen's dict observations and old gym step API are adapted in
  the ENVIRONMENT section only;
- the IMPALA CNN (Espeholt et al. 2018): three stacks of conv + max-pool + two residual blocks (16, 32, 32
  channels), then 256 hidden units; `--network nature` puts the Nature CNN of ppo_atari.py on the same input,
  for the comparison the seed material made (IMPALA clearly better, most of all on bigfish);
- the Procgen paper's PPO settings (64 envs x 256 steps, 8 minibatches, 3 epochs, lr 5e-4 constant, gamma
  0.999), with rewards divided by the running std of the discounted return (ppo_continuous.py's RewardScaler);
- generalisation: `--num-test-envs` more environments on levels never trained on, played by the same policy
  alongside training and logged as `charts/test_episodic_return` next to `charts/episodic_return`.

Paper: Cobbe et al. 2020, "Leveraging Procedural Generation to Benchmark Reinforcement Learning",
https://arxiv.org/abs/1912.01588; IMPALA CNN: Espeholt et al. 2018, https://arxiv.org/abs/1802.01561.

Run:    python ppo_procgen_impala.py --env-id bigfish --seed 1
Expect: after 25M steps (easy, every level) about 16-20 on bigfish, 31-34 on starpilot, 9 on bossfight
        (CleanRL 16.5 / 31.0 / 8.9; baselines rerun 20.1 / 34.0 / 9.4). That is a GPU budget; what this
        2-core CPU machine reaches is in the README, with the command.
"""

import contextlib
import difflib
import io
import json
import os
import random
import re
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro


# ---------------------------------------------------------------------------------------------------------
# ARGUMENTS
# ---------------------------------------------------------------------------------------------------------
class UsageError(Exception):
    """A bad command line or environment id: reported as one line, before anything is written."""


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use CUDA when it is available"""
    torch_threads: int = 2
    """CPU threads for torch; 2 is fastest for the CNNs on the 2-core machine (README, speed section)"""
    pin_cpu: bool = False
    """on CPU, run the whole process (envpool's workers too) on the core it starts on; off: the CNN wants
    every core (README, Speed)"""
    track: bool = False
    """if toggled, also log to Weights & Biases (imported only then)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project name"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team or user); None uses your default"""
    capture_video: bool = False
    """if toggled, record the evaluation episodes (at least one) to `<run>/videos` (needs moviepy)"""
    save_model: bool = False
    """if toggled, write `<run>/checkpoint.pt` every `--save-interval` iterations and at the end"""
    save_interval: int = 25
    """iterations between checkpoints with `--save-model`"""
    resume: Optional[str] = None
    """path of a checkpoint to continue from; its run's arguments are the defaults, flags given override them"""
    run_dir: str = "runs"
    """directory that holds one sub-directory per run"""
    progress: bool = True
    """show a progress bar when stdout is a terminal"""

    # Algorithm specific arguments
    env_id: str = "bigfish"
    """a Procgen game (`bigfish`, or `procgen-bigfish-v0`) or a gymnasium id with (64, 64, 3) images"""
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"
    """for ids that are not Procgen games: `auto` uses envpool when it has the id, gymnasium otherwise"""
    distribution_mode: Literal["easy", "hard"] = "easy"
    """Procgen's level difficulty (the paper's `easy`: 25M steps; `hard`: 200M)"""
    num_levels: int = 0
    """training levels, from --start-level on; 0: every level (the paper's sample efficiency setting; 200
    with easy is its generalisation setting)"""
    start_level: int = 0
    """the first training level"""
    num_test_envs: int = 16
    """environments on unseen levels, played alongside training (charts/test_episodic_return); 0: none"""
    network: Literal["impala", "nature"] = "impala"
    """the CNN: `impala` (residual, 16-32-32 channels, 256 units) or `nature` (the Nature CNN, for comparison)"""
    total_timesteps: int = 25_000_000
    """total environment steps, summed over environments"""
    learning_rate: float = 5e-4
    """the learning rate of the Adam optimizer (typical 1e-4 to 1e-3)"""
    num_envs: int = 64
    """the number of parallel environments"""
    num_steps: int = 256
    """the number of steps per environment in each rollout"""
    anneal_lr: bool = False
    """linearly anneal the learning rate to 0 over the run (the Procgen paper keeps it constant)"""
    gamma: float = 0.999
    """the discount factor (0.9 to 0.999)"""
    gae_lambda: float = 0.95
    """the lambda of generalised advantage estimation (0.9 to 1; 1 gives Monte Carlo advantages)"""
    num_minibatches: int = 8
    """the number of minibatches each batch is split into"""
    update_epochs: int = 3
    """the number of passes over each batch"""
    norm_adv: bool = True
    """normalise advantages within each minibatch to mean 0, std 1"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient epsilon (0.1 to 0.3)"""
    clip_vloss: bool = True
    """clip the value loss around the old values, as in the PPO paper's code"""
    ent_coef: float = 0.01
    """the coefficient of the entropy bonus (0 to 0.01)"""
    vf_coef: float = 0.5
    """the coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm of the gradient; larger gradients are scaled down to it"""
    target_kl: Optional[float] = None
    """stop the epochs of an update early once an epoch's mean approximate KL exceeds it (0.01 to 0.05); None: off"""
    norm_reward: bool = True
    """divide rewards by the running std of the discounted return (gamma as above), clipped to [-10, 10]"""
    bootstrap_truncation: bool = True
    """bootstrap a time-limit truncation from V(final observation); off treats it as a termination (classic)"""
    eval_episodes: int = 0
    """episodes of greedy play (argmax action) on unseen levels after training, logged as eval/episodic_return"""
    compile: bool = False
    """if toggled, torch.compile acting and the loss (README, Speed: measured; the first iteration compiles)"""
    cudagraphs: bool = False
    """if toggled (CUDA only), also record them as CUDA graphs (torch.compile's mode `reduce-overhead`)"""

    # to be filled in __post_init__
    batch_size: int = field(init=False)
    """the batch size (num_envs * num_steps)"""
    minibatch_size: int = field(init=False)
    """the minibatch size (batch_size // num_minibatches)"""
    num_iterations: int = field(init=False)
    """the number of iterations (total_timesteps // batch_size)"""

    def __post_init__(self):
        for name in (
            "num_envs",
            "num_steps",
            "num_minibatches",
            "update_epochs",
            "torch_threads",
            "save_interval",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UsageError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.eval_episodes < 0:
            raise UsageError(f"--eval-episodes must be >= 0, got {self.eval_episodes}")
        for name in ("num_levels", "start_level", "num_test_envs"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        self.batch_size = self.num_envs * self.num_steps
        if self.batch_size % self.num_minibatches:
            raise UsageError(
                f"--num-minibatches {self.num_minibatches} must divide the batch size "
                f"{self.batch_size} (--num-envs {self.num_envs} x --num-steps {self.num_steps})"
            )
        self.minibatch_size = self.batch_size // self.num_minibatches
        self.num_iterations = self.total_timesteps // self.batch_size
        if self.num_iterations < 1:
            raise UsageError(
                f"--total-timesteps {self.total_timesteps} is less than one batch ({self.batch_size} steps)"
            )
        if self.resume is not None and not os.path.isfile(self.resume):
            raise UsageError(f"--resume: no checkpoint file at '{self.resume}'")


# ---------------------------------------------------------------------------------------------------------
# ENVIRONMENT
# ---------------------------------------------------------------------------------------------------------
PROCGEN_GAMES = (
    "bigfish bossfight caveflyer chaser climber coinrun dodgeball fruitbot heist jumper leaper maze miner ninja "
    "plunder starpilot"
).split()


def procgen_game(env_id: str):
    """The game's name when env_id names a Procgen game (`bigfish` or `procgen-bigfish-v0`), else None."""
    name = env_id.removeprefix("procgen:").removeprefix("procgen-").removesuffix("-v0")
    if name in PROCGEN_GAMES:
        return name
    if env_id.startswith(("procgen-", "procgen:")):  # unmistakably meant as Procgen: name the games
        close = difflib.get_close_matches(name, PROCGEN_GAMES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; the games: {' '.join(PROCGEN_GAMES)}"
        raise UsageError(f"unknown Procgen game '{name}' in '{env_id}'{hint}")
    return None


class ProcgenVectorEnv:
    """procgen's ProcgenEnv in the vector API the training loop uses (reset, step, render, close, spaces).

    procgen steps its games in C++ and speaks the old gym VecEnv API: observations are dicts {"rgb": frames},
    step() returns (obs, reward, done, infos), and a finished episode is reset INSIDE the step that ends it:
    that step returns the first frame of the next level, and the final frame is never shown. So, unlike
    envpool and gymnasium, there is no autoreset step whose action is ignored (`autoreset_next_step` is
    False), and every `done` is a termination: procgen's time-outs are part of the game, as in the paper.
    """

    autoreset_next_step = False

    def __init__(self, game, num_envs, seed, num_levels, start_level, distribution_mode, render=False):
        with contextlib.redirect_stderr(io.StringIO()):
            from procgen import ProcgenEnv  # gym3 imports old gym, which prints a notice

        self.env = ProcgenEnv(
            num_envs=num_envs,
            env_name=game,
            num_levels=num_levels,
            start_level=start_level,
            distribution_mode=distribution_mode,
            rand_seed=seed,  # seeds the choice of levels and the games' own randomness
            render_mode="rgb_array" if render else None,
        )
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.single_action_space = gym.spaces.Discrete(self.env.action_space.n)
        self.backend = "procgen"
        levels = f"levels {start_level}-{start_level + num_levels - 1}" if num_levels else "every level"
        self.protocol = f"{game}, {distribution_mode}, {levels}"
        self.render_fps = 15

    def reset(self):
        return self.env.reset()["rgb"], {}

    def step(self, actions):
        obs, reward, done, _ = self.env.step(actions)
        return obs["rgb"], reward.astype(np.float32), done.astype(bool), np.zeros(self.num_envs, bool), {}

    def render(self):
        return self.env.render(mode="rgb_array")[None]  # env 0's 512x512 view

    def close(self):
        self.env.close()


def make_env(
    env_id: str,
    num_envs: int,
    seed: int,
    backend: str = "auto",
    render: bool = False,
    num_levels: int = 0,
    start_level: int = 0,
    distribution_mode: str = "easy",
):
    """Vectorised environments, seeded, with the next-step autoreset of envpool and gymnasium >= 1.0.

    When an episode ends at step t, the observation returned by step t is the FINAL observation of that
    episode; step t+1 ignores its action, resets, and returns reward 0 with the first observation of the
    next episode. The training loop relies on exactly this, on both backends. Procgen games reset within
    step t instead (ProcgenVectorEnv): `envs.autoreset_next_step` tells the loop which kind it has.
    """
    game = procgen_game(env_id)
    if game is not None:
        return ProcgenVectorEnv(game, num_envs, seed, num_levels, start_level, distribution_mode, render)

    with contextlib.redirect_stderr(io.StringIO()):
        import envpool  # here, so that importing this script does no work; it prints old gym's notice

    if backend == "envpool" or (backend == "auto" and env_id in envpool.list_all_envs()):
        if env_id not in envpool.list_all_envs():
            raise UsageError(f"envpool has no environment '{env_id}'")
        # envpool's float64 Box bounds make gymnasium warn each time it builds the spaces
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*precision lowered.*")
            envs = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=seed)
            envs.single_observation_space = envs.observation_space
            envs.single_action_space = envs.action_space
        envs.num_envs = num_envs
        envs.backend = "envpool"
        envs.protocol, envs.autoreset_next_step = "as registered", True
        return envs

    try:
        envs = gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP},
            **({"render_mode": "rgb_array"} if render else {}),
        )
    except gym.error.Error as e:
        known = list(gym.registry) + list(envpool.list_all_envs()) + PROCGEN_GAMES
        close = difflib.get_close_matches(env_id.split(":")[-1], known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown environment id '{env_id}'{hint}") from e
    except ImportError as e:
        raise UsageError(f"environment id '{env_id}': cannot import its module ({e})") from e
    envs.reset(seed=seed)  # seeds every sub-environment; later resets continue from these seeds
    envs.backend = "gymnasium"
    envs.protocol, envs.autoreset_next_step = "as registered", True
    envs.render_fps = envs.metadata.get("render_fps") or 30
    return envs


def check_spaces(envs):
    """ppo_procgen_impala.py handles 64x64 RGB uint8 images and discrete actions; say which script fits otherwise."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if (
        not isinstance(obs_space, gym.spaces.Box)
        or obs_space.shape != (64, 64, 3)
        or obs_space.dtype != np.uint8
    ):
        raise UsageError(
            f"ppo_procgen_impala.py needs (64, 64, 3) uint8 images, this env has {obs_space}; use ppo.py for "
            "vector observations or ppo_atari.py for (4, 84, 84) frames"
        )
    if not isinstance(act_space, gym.spaces.Discrete):
        raise UsageError(f"ppo_procgen_impala.py needs discrete actions, this env has {act_space}")


class RunningMeanStd(nn.Module):
    """Running mean and (population) variance of a stream of batches, merged with the parallel formula of
    Chan et al. (1979); the first batch gives exactly its own mean and variance. Buffers, so that they are
    saved and moved with the module that owns them."""

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x):
        """Merge a batch x of shape (batch, *shape)."""
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0, correction=0), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean.add_(delta * batch_count / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)


class RewardScaler:
    """Rewards divided by the running std of the discounted return, clipped to [-clip, clip] (detail 4 of
    the MuJoCo details; gymnasium's NormalizeReward). Only scaled, not shifted: shifting rewards would
    change the task (e.g. turn a survival bonus into a penalty). Works on a whole rollout: the discounted
    return of each env carries over from one rollout to the next, the statistics are updated once per rollout."""

    def __init__(self, num_envs, gamma, clip=10.0):
        self.rms = RunningMeanStd()
        self.gamma, self.clip = gamma, clip
        self.discounted = np.zeros(num_envs)  # the running discounted return of each env's current episode

    def __call__(self, rewards, dones, valid):
        """Scaled rewards of a rollout; rewards, dones, valid are (num_steps, num_envs) arrays."""
        returns = np.zeros(rewards.shape)
        for t in range(rewards.shape[0]):
            self.discounted = self.discounted * self.gamma + rewards[t]
            returns[t] = self.discounted
            self.discounted = self.discounted * (1.0 - dones[t])  # a new episode starts from 0
        self.rms.update(torch.as_tensor(returns[valid.astype(bool)]))  # no autoreset steps
        return np.clip(rewards / np.sqrt(self.rms.var.item() + 1e-8), -self.clip, self.clip).astype(
            np.float32
        )

    def state_dict(self):
        return {"rms": self.rms.state_dict(), "discounted": self.discounted.copy()}

    def load_state_dict(self, state):
        self.rms.load_state_dict(state["rms"])
        self.discounted = state["discounted"].copy()


# ---------------------------------------------------------------------------------------------------------
# NETWORK
# ---------------------------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    """Orthogonal weights with gain `std` and constant bias, as in baselines' PPO (detail 2 of the 37)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), both convolutions 3x3 with the input's channels."""

    def __init__(self, channels):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


def impala_stack(in_channels, out_channels):
    """One stack of the IMPALA CNN: a 3x3 convolution, a 3x3 max-pool of stride 2 (halves the size), and two
    residual blocks."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1),
        ResidualBlock(out_channels),
        ResidualBlock(out_channels),
    )


class Agent(nn.Module):
    """A CNN trunk shared by a policy head and a value head, on (64, 64, 3) uint8 images.

    `impala` (Espeholt et al. 2018, the Procgen paper's network): stacks of 16, 32, 32 channels take the
    image from 64x64 to 32x32, 16x16 and 8x8; 32 x 8 x 8 features -> 256 units. Its convolutions keep
    PyTorch's default initialisation (as CleanRL's ppo_procgen.py); the linear layers are orthogonal.
    `nature` (Mnih et al. 2015, ppo_atari.py's network): 8x8/4, 4x4/2, 3x3/1 convolutions take 64x64 to
    15x15, 6x6 and 4x4; 64 x 4 x 4 features -> 512 units. The policy head's 0.01 gain makes the initial
    policy close to uniform; the value head's gain is 1 (baselines' PPO).
    """

    def __init__(self, observation_space, action_space, network="impala"):
        super().__init__()
        channels = observation_space.shape[-1]  # images are (height, width, channels)
        if network == "impala":
            self.network = nn.Sequential(
                impala_stack(channels, 16),  # (3, 64, 64) -> (16, 32, 32)
                impala_stack(16, 32),  # -> (32, 16, 16)
                impala_stack(32, 32),  # -> (32, 8, 8)
                nn.Flatten(),
                nn.ReLU(),
                layer_init(nn.Linear(32 * 8 * 8, 256)),
                nn.ReLU(),
            )
            hidden_size = 256
        else:
            self.network = nn.Sequential(
                layer_init(nn.Conv2d(channels, 32, 8, stride=4)),  # (3, 64, 64) -> (32, 15, 15)
                nn.ReLU(),
                layer_init(nn.Conv2d(32, 64, 4, stride=2)),  # -> (64, 6, 6)
                nn.ReLU(),
                layer_init(nn.Conv2d(64, 64, 3, stride=1)),  # -> (64, 4, 4)
                nn.ReLU(),
                nn.Flatten(),
                layer_init(nn.Linear(64 * 4 * 4, 512)),
                nn.ReLU(),
            )
            hidden_size = 512
        self.actor = layer_init(nn.Linear(hidden_size, action_space.n), std=0.01)
        self.critic = layer_init(nn.Linear(hidden_size, 1), std=1.0)
        # Channels-last (NHWC) memory: the CPU convolution kernels are much faster with it (README, speed
        # section); on a GPU it is neutral or better.
        self.to(memory_format=torch.channels_last)

    def hidden(self, x):
        # (N, 64, 64, 3) uint8 -> (N, 3, 64, 64) floats in [0, 1]. The permuted view of NHWC memory is
        # already channels-last: no copy but the conversion.
        x = x.permute(0, 3, 1, 2).float() / 255.0
        return self.network(x)

    def get_value(self, x):
        return self.critic(self.hidden(x)).squeeze(-1)

    # The categorical distribution is written out (log-softmax, sampling, log-prob, entropy) instead of
    # building a torch.distributions.Categorical: the formulas are worth seeing, and ppo.py does the same.
    def get_action(self, x):
        """Sample actions for acting, with the value of the same frames (one trunk pass for both)."""
        hidden = self.hidden(x)
        logits = self.actor(hidden)
        action = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
        logprob = logits.log_softmax(-1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
        return action, logprob, self.critic(hidden).squeeze(-1)

    def get_action_and_value(self, x, action=None):
        hidden = self.hidden(x)
        log_probs = self.actor(hidden).log_softmax(-1)  # log pi(a|s) for every action a
        if action is None:
            action = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
        logprob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, logprob, entropy, self.critic(hidden).squeeze(-1)

    def greedy_action(self, x):
        return self.actor(self.hidden(x)).argmax(-1)


# ---------------------------------------------------------------------------------------------------------
# ALGORITHM (pure functions: tensors in, tensors out; the tests import them)
# ---------------------------------------------------------------------------------------------------------
def compute_gae(rewards, values, next_values, terminations, dones, gamma, gae_lambda):
    """Generalised advantage estimation (Schulman et al. 2016), all arguments (num_steps, num_envs).

    next_values[t] is V of the true next state of step t (the final observation when the episode ended);
    terminations[t] stops bootstrapping (a true end: the next state has value 0);
    dones[t] (termination or truncation) stops the advantage chain: step t+1 belongs to another episode.
    """
    # TD errors of every step at once; only the backward recursion needs a loop over time
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values
    chain = gamma * gae_lambda * (1.0 - dones)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        lastgaelam = deltas[t] + chain[t] * lastgaelam
        advantages[t] = lastgaelam
    returns = advantages + values
    return advantages, returns


def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1 (0 if there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def normalize_advantages(advantages, mask):
    """Advantages shifted and scaled to mean 0 and std 1 over the valid entries. The population std (not the
    unbiased one) keeps a minibatch of a single sample finite: its advantage becomes 0, not NaN."""
    mean = masked_mean(advantages, mask)
    std = masked_mean((advantages - mean) ** 2, mask).sqrt()
    return (advantages - mean) / (std + 1e-8)


def explained_variance(y_pred, y_true):
    """1 - Var[y_true - y_pred] / Var[y_true]: 1 is a perfect value function, 0 is no better than the mean,
    negative is worse. NaN when Var[y_true] is 0 (constant returns): it is undefined there."""
    var_y = torch.var(y_true, correction=0)
    ev = 1.0 - torch.var(y_true - y_pred, correction=0) / var_y
    return torch.where(var_y > 0, ev, torch.full_like(ev, float("nan")))


def ppo_loss(newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, entropy, mask, args):
    """The clipped PPO objective on one minibatch, averaged over its valid steps (mask == 1).

    Returns the loss to minimise and a dict of 0-dim tensors for logging.
    """
    weights = mask / mask.sum().clamp(min=1.0)  # mean over the valid steps = weighted sum
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    with torch.no_grad():
        # http://joschu.net/blog/kl-approx.html: k1 (old_approx_kl) and the unbiased, lower-variance k3
        old_approx_kl = (-logratio * weights).sum()
        approx_kl = (((ratio - 1) - logratio) * weights).sum()
        clipfrac = (((ratio - 1.0).abs() > args.clip_coef).float() * weights).sum()

    if args.norm_adv:
        advantages = normalize_advantages(advantages, mask)

    # Clipped surrogate: the pessimistic (max of the negatives) of the unclipped and clipped objectives
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = (torch.max(pg_loss1, pg_loss2) * weights).sum()

    if args.clip_vloss:
        v_loss_unclipped = (newvalue - returns) ** 2
        v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss = 0.5 * (torch.max(v_loss_unclipped, v_loss_clipped) * weights).sum()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2 * weights).sum()

    entropy_loss = (entropy * weights).sum()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    stats = {
        "policy_loss": pg_loss.detach(),
        "value_loss": v_loss.detach(),
        "entropy": entropy_loss.detach(),
        "old_approx_kl": old_approx_kl,
        "approx_kl": approx_kl,
        "clipfrac": clipfrac,
    }
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# RUN BOOK-KEEPING (CPU core, run directory, checkpoint, summary)
# ---------------------------------------------------------------------------------------------------------
def pin_to_current_core():
    """Restrict this thread, and every thread it starts from now on (torch's, the environments' workers), to
    the CPU core it is running on; return that core, or None where the OS has no CPU affinity (not Linux).
    Already restricted to one core (`taskset -c 3 python ...`), it stays there."""
    if not (hasattr(os, "sched_setaffinity") and os.path.exists("/proc/thread-self/stat")):
        return None
    with open("/proc/thread-self/stat") as f:
        core = int(f.read().rsplit(")", 1)[1].split()[36])  # field 39 of proc(5): the CPU it last ran on
    os.sched_setaffinity(0, {core})
    return core


def make_run_path(args) -> str:
    """`<run_dir>/<env_id>__<exp_name>__<seed>__<unix time>`, with characters unsafe in paths replaced."""
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = re.sub(r"[^A-Za-z0-9_.\-]", "-", run_name)
    path, n = os.path.join(args.run_dir, run_name), 1
    while os.path.exists(path):  # two runs started in the same second
        path, n = os.path.join(args.run_dir, f"{run_name}-{n}"), n + 1
    os.makedirs(path)
    return path


def save_checkpoint(path, agent, optimizer, args, global_step, iteration, episode_returns, reward_scaler):
    """Everything needed to continue the run, written to a temporary file and renamed, so that a crash or
    Ctrl-C during the write never leaves a truncated checkpoint behind."""
    state = {
        "agent": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "args": {f.name: getattr(args, f.name) for f in fields(args) if f.init},
        "global_step": global_step,
        "iteration": iteration,
        "episode_returns": list(episode_returns),
        "reward_scaler": reward_scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint '{path}': {type(e).__name__}: {e}") from e


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def evaluate(agent, env_id, episodes, seed, device, backend, video_folder=None, **levels):
    """Play `episodes` whole episodes with the greedy policy on a fresh environment (on `levels`: Procgen's
    num_levels, start_level, distribution_mode) and return their returns. With `video_folder`, each episode
    is written there as an mp4."""
    envs = make_env(env_id, 1, seed, backend, render=video_folder is not None, **levels)
    obs, _ = envs.reset()
    returns, total = [], 0.0
    frames = [np.asarray(envs.render()[0])] if video_folder else []
    while len(returns) < episodes:
        with torch.inference_mode():
            action = agent.greedy_action(torch.as_tensor(obs, device=device))
        obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
        if video_folder:
            frames.append(np.asarray(envs.render()[0]))
        total += float(reward[0])
        if terminated[0] or truncated[0]:
            returns.append(total)
            total = 0.0
            if video_folder:
                from moviepy import ImageSequenceClip

                os.makedirs(video_folder, exist_ok=True)
                path = os.path.join(video_folder, f"eval-episode-{len(returns) - 1}.mp4")
                ImageSequenceClip(frames, fps=envs.render_fps).write_videofile(path, logger=None)
                frames = []
    envs.close()
    return returns


# ---------------------------------------------------------------------------------------------------------
# MAIN
# ---------------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # --pin-cpu, first, so that every thread started later inherits it. envpool steps the environments in
    # worker threads; on another core, every step's hand-off between the training loop and a worker costs
    # more than a CartPole step itself (README, Speed: ppo.py on the 2-core machine, 9k -> 12-13k SPS).
    cpu_core = pin_to_current_core() if args.pin_cpu and device.type == "cpu" else None
    torch.set_num_threads(args.torch_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # Everything that can fail on the user's input fails here, before anything is written.
    if args.cudagraphs and device.type != "cuda":
        raise UsageError("--cudagraphs needs a CUDA device (CUDA graphs replay GPU kernels)")
    ckpt = load_checkpoint(args.resume, device) if args.resume else None
    levels = dict(
        num_levels=args.num_levels, start_level=args.start_level, distribution_mode=args.distribution_mode
    )
    # Unseen levels for the test: every level from the first one after the training levels on (with
    # --num-levels 0 the training levels are all levels, and the test plays levels drawn the same way).
    test_levels = dict(
        num_levels=0, start_level=args.start_level + args.num_levels, distribution_mode=args.distribution_mode
    )
    envs = make_env(
        args.env_id,
        args.num_envs,
        args.seed + (ckpt["global_step"] if ckpt else 0),
        args.env_backend,
        **levels,
    )
    check_spaces(envs)
    test_envs = None
    if args.num_test_envs > 0:
        test_seed = args.seed + 1_000_000 + (ckpt["global_step"] if ckpt else 0)
        test_envs = make_env(args.env_id, args.num_test_envs, test_seed, args.env_backend, **test_levels)
    if args.capture_video:
        try:
            import moviepy  # noqa: F401  (evaluate() writes the videos with it)
        except ImportError as e:
            raise UsageError("--capture-video needs moviepy: pip install -e '.[video]'") from e
        try:  # render one frame now, so that a missing renderer is reported before training, not after
            probe_env = make_env(args.env_id, 1, args.seed, args.env_backend, render=True, **test_levels)
            probe_env.reset()
            if probe_env.render() is None:
                raise ValueError("render() returned no frame")
            probe_env.close()
        except Exception as e:
            raise UsageError(f"--capture-video: cannot render '{args.env_id}' as rgb_array ({e})") from e

    agent = Agent(envs.single_observation_space, envs.single_action_space, args.network).to(device)
    reward_scaler = RewardScaler(args.num_envs, args.gamma)
    # eps=1e-5 as in baselines ppo2; fused=True: one kernel for all parameters (1.3 -> 1.1 ms a minibatch here)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    global_step, start_iteration = 0, 1
    episode_returns = deque(maxlen=100)  # the last 100 whole-episode returns, for the summary
    if ckpt:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        reward_scaler.load_state_dict(ckpt["reward_scaler"])
        global_step, start_iteration = ckpt["global_step"], ckpt["iteration"] + 1
        episode_returns.extend(ckpt["episode_returns"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        run_path = os.path.dirname(os.path.abspath(args.resume))  # the resumed run continues its own logs
    else:
        run_path = make_run_path(args)
    checkpoint_path = os.path.join(run_path, "checkpoint.pt")
    write_json(os.path.join(run_path, "args.json"), asdict(args))

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=asdict(args),
            name=os.path.basename(run_path),
            dir=run_path,
            save_code=True,
        )
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_path)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    )

    # Ctrl-C: finish the current iteration, then checkpoint, flush and exit. A second Ctrl-C quits at once.
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(
            "\ninterrupt: finishing this iteration, then saving a checkpoint (Ctrl-C again quits now)",
            flush=True,
        )

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    writer.add_text("environment", f"{args.env_id}: {envs.backend}, protocol {envs.protocol}")
    print(
        f"run: {run_path}  env: {args.env_id} ({envs.backend}, {envs.protocol})  device: {device}", flush=True
    )

    # --compile: acting and the loss through torch.compile, which fuses their many small operations into a
    # few kernels (README, Speed: what it buys, measured); --cudagraphs also records them as CUDA graphs.
    # GAE stays eager: its loop over time would be unrolled into a graph of num_steps steps, which compiled
    # in 16 s for 128 steps and in 251 s for MuJoCo's 2,048 on the 2-core machine, to save 1 and 10 ms an
    # iteration.
    loss_fn = ppo_loss
    if args.compile or args.cudagraphs:
        mode = "reduce-overhead" if args.cudagraphs else "default"
        agent.get_action = torch.compile(agent.get_action, mode=mode)
        agent.get_action_and_value = torch.compile(agent.get_action_and_value, mode=mode)
        loss_fn = torch.compile(ppo_loss, mode=mode)

    # Storage, allocated once on the device.
    # (T, N, 64, 64, 3) uint8 images, as the env gives them: the network converts them to floats
    obs_shape = (args.num_steps, args.num_envs) + envs.single_observation_space.shape
    obs = torch.zeros(obs_shape, dtype=torch.uint8, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)  # (T, N)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)  # (T, N) log pi_old(a|s)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)  # (T, N) V_old(s)
    # Rewards and episode ends arrive on the host; they are gathered there and moved to the device once
    # per rollout instead of once per step. All (T, N) = (num_steps, num_envs).
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)  # true ends: no bootstrap
    dones = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)  # terminated or truncated
    # valid[t] = 0 marks the autoreset step after an episode end: the env ignored its action, so it
    # carries no information about the policy and must not enter the loss.
    valid = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)

    from tqdm import tqdm

    show_bar = args.progress and sys.stdout.isatty()
    bar = tqdm(
        total=args.num_iterations * args.batch_size, initial=global_step, unit="step", disable=not show_bar
    )
    start_time, start_step = time.time(), global_step
    next_obs_np, _ = envs.reset()
    next_obs = torch.as_tensor(next_obs_np, device=device)
    next_autoreset = np.zeros(args.num_envs, dtype=bool)
    test_episode_returns = deque(maxlen=100)  # the last 100 returns on unseen levels
    if test_envs is not None:
        test_obs = torch.as_tensor(test_envs.reset()[0], device=device)
        test_return = np.zeros(args.num_test_envs, dtype=np.float64)
    episode_return = np.zeros(args.num_envs, dtype=np.float64)
    episode_length = np.zeros(args.num_envs, dtype=np.int64)
    episodes = 0
    iteration = start_iteration - 1
    status = "finished"

    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # ---- rollout ----
        finished_returns, finished_lengths, finished_test_returns = [], [], []
        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            valid[step] = ~next_autoreset

            with torch.inference_mode():
                action, logprob, value = agent.get_action(next_obs)
            actions[step] = action
            logprobs[step] = logprob
            values[step] = value

            next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            next_obs = torch.as_tensor(next_obs_np, device=device)
            ended = terminated | truncated
            rewards[step] = reward
            dones[step] = ended
            # THE termination / truncation decision. A time-limit truncation is not a true end: the next
            # state (the final observation, returned at this step) still has value, so by default the
            # target bootstraps from it. --no-bootstrap-truncation treats it as a termination.
            terminations[step] = terminated if args.bootstrap_truncation else ended

            # Episode accounting: the autoreset step is not part of any episode.
            episode_return += reward
            episode_length += ~next_autoreset
            for i in np.flatnonzero(ended):
                finished_returns.append(float(episode_return[i]))
                finished_lengths.append(int(episode_length[i]))
            episode_return[ended] = 0.0
            episode_length[ended] = 0
            # Procgen resets within the step that ends an episode: its next step is an ordinary one.
            next_autoreset = ended if envs.autoreset_next_step else np.zeros_like(ended)

            # The test: the same policy, sampling as in training, on levels it never trains on; not stored.
            if test_envs is not None:
                with torch.inference_mode():
                    test_action, _, _ = agent.get_action(test_obs)
                test_obs_np, test_reward, test_terminated, test_truncated, _ = test_envs.step(
                    test_action.cpu().numpy()
                )
                test_obs = torch.as_tensor(test_obs_np, device=device)
                test_return += test_reward
                test_ended = test_terminated | test_truncated
                finished_test_returns.extend(test_return[test_ended].tolist())
                test_return[test_ended] = 0.0

        episodes += len(finished_returns)
        episode_returns.extend(finished_returns)
        if finished_returns:
            writer.add_scalar("charts/episodic_return", np.mean(finished_returns), global_step)
            writer.add_scalar("charts/episodic_length", np.mean(finished_lengths), global_step)
        test_episode_returns.extend(finished_test_returns)
        if finished_test_returns:
            writer.add_scalar("charts/test_episodic_return", np.mean(finished_test_returns), global_step)

        # ---- advantages ----
        # Episode returns above are the raw ones; the learning signal uses the scaled rewards.
        scaled_rewards = reward_scaler(rewards, dones, valid) if args.norm_reward else rewards
        with torch.no_grad():
            # values[] came with the actions (shared trunk); only the observation after the rollout is new
            next_value = agent.get_value(next_obs)
            # obs[t + 1] is the observation returned by step t: with next-step autoreset it is the true
            # next state, the final observation when step t ended an episode.
            next_values = torch.cat([values[1:], next_value[None]])
            b_rewards, b_terminations, b_dones = (
                torch.as_tensor(x, device=device) for x in (scaled_rewards, terminations, dones)
            )
            advantages, returns = compute_gae(
                values=values,
                next_values=next_values,
                rewards=b_rewards,
                terminations=b_terminations,
                dones=b_dones,
                gamma=args.gamma,
                gae_lambda=args.gae_lambda,
            )

        # flatten the batch
        b_obs = obs.reshape((-1,) + envs.single_observation_space.shape)
        b_actions = actions.reshape(-1)
        b_logprobs = logprobs.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)
        b_valid = torch.as_tensor(valid, device=device).reshape(-1)

        # ---- update ----
        sums = {}  # sums of the per-minibatch statistics, on the device: one host sync per iteration
        num_updates = 0
        for epoch in range(args.update_epochs):
            epoch_kl = torch.zeros((), device=device)
            b_inds = torch.randperm(args.batch_size, device=device)
            for start in range(0, args.batch_size, args.minibatch_size):
                mb_inds = b_inds[start : start + args.minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                    b_obs[mb_inds], b_actions[mb_inds]
                )
                loss, stats = loss_fn(
                    newlogprob=newlogprob,
                    oldlogprob=b_logprobs[mb_inds],
                    advantages=b_advantages[mb_inds],
                    newvalue=newvalue,
                    oldvalue=b_values[mb_inds],
                    returns=b_returns[mb_inds],
                    entropy=entropy,
                    mask=b_valid[mb_inds],
                    args=args,
                )
                optimizer.zero_grad()
                loss.backward()
                stats["grad_norm"] = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                epoch_kl += stats["approx_kl"]
                num_updates += 1
            if (
                args.target_kl is not None
                and (epoch_kl / (args.batch_size // args.minibatch_size)) > args.target_kl
            ):
                break

        # ---- logging ----
        means = {k: (v / num_updates).item() for k, v in sums.items()}
        # One NaN or inf in any minibatch's losses or gradient norm makes its sum non-finite.
        if not all(np.isfinite(v) for v in means.values()):
            status = "non-finite loss"
            break
        b_valid_bool = b_valid.bool()
        ev = explained_variance(b_values[b_valid_bool], b_returns[b_valid_bool]).item()
        valid_adv = b_advantages[b_valid_bool]
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
            writer.add_scalar(f"losses/{k}", means[k], global_step)
        writer.add_scalar("losses/explained_variance", ev, global_step)
        if envs.single_action_space.n > 1:  # entropy / log|A| is undefined with a single action (probes 1-3)
            writer.add_scalar(
                "debug/relative_entropy", means["entropy"] / np.log(envs.single_action_space.n), global_step
            )
        writer.add_scalar("debug/residual_variance", 1.0 - ev, global_step)
        writer.add_scalar("debug/advantage_mean", valid_adv.mean().item(), global_step)
        writer.add_scalar("debug/advantage_std", valid_adv.std(correction=0).item(), global_step)
        writer.add_scalar("debug/grad_norm", means["grad_norm"], global_step)
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/SPS", sps, global_step)

        recent = float(np.mean(episode_returns)) if episode_returns else float("nan")
        bar.update(args.batch_size)
        bar.set_postfix(sps=sps, ret=f"{recent:.1f}", refresh=False)
        if not show_bar and args.progress and iteration % max(1, args.num_iterations // 10) == 0:
            print(f"step {global_step:>10}  return(last100) {recent:8.2f}  SPS {sps}", flush=True)

        if args.save_model and iteration % args.save_interval == 0:
            save_checkpoint(
                checkpoint_path,
                agent,
                optimizer,
                args,
                global_step,
                iteration,
                episode_returns,
                reward_scaler,
            )
        if interrupted:
            status = "interrupted"
            break

    bar.close()
    signal.signal(signal.SIGINT, previous_handler)
    envs.close()
    if test_envs is not None:
        test_envs.close()

    if status == "non-finite loss":
        writer.close()
        kept = f"; the last good checkpoint is {checkpoint_path}" if os.path.exists(checkpoint_path) else ""
        raise FloatingPointError(
            f"non-finite loss at iteration {iteration} (global step {global_step}): stopped{kept}"
        )
    if args.save_model or status == "interrupted":
        save_checkpoint(
            checkpoint_path, agent, optimizer, args, global_step, iteration, episode_returns, reward_scaler
        )

    summary = {
        "env_id": args.env_id,
        "seed": args.seed,
        "global_step": global_step,
        "episodes": episodes,
        "episodic_return_mean_last100": float(np.mean(episode_returns)) if episode_returns else None,
        "sps": int((global_step - start_step) / (time.time() - start_time)),
        "wall_seconds": round(time.time() - start_time, 2),
        "status": status,
        "backend": envs.backend,
        "cpu_core": cpu_core,
        "protocol": envs.protocol,
        "test_episodic_return_mean_last100": (
            float(np.mean(test_episode_returns)) if test_episode_returns else None
        ),
        "run_dir": run_path,
    }
    if status == "finished" and (args.eval_episodes > 0 or args.capture_video):
        video_folder = os.path.join(run_path, "videos") if args.capture_video else None
        eval_returns = evaluate(
            agent,
            args.env_id,
            max(1, args.eval_episodes),
            args.seed,
            device,
            args.env_backend,
            video_folder,
            **test_levels,
        )
        for i, r in enumerate(eval_returns):
            writer.add_scalar("eval/episodic_return", r, i)
        summary["eval_return_mean"] = float(np.mean(eval_returns))
    write_json(os.path.join(run_path, "summary.json"), summary)
    writer.close()
    if args.track:
        wandb.finish()
    print(json.dumps(summary), flush=True)
    return summary


def parse_args(argv=None) -> Args:
    """tyro parsing; with --resume, the checkpoint's arguments become the defaults (given flags override)."""
    argv = sys.argv[1:] if argv is None else argv
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("--resume=")), None)
    if resume is None and "--resume" in argv and argv.index("--resume") + 1 < len(argv):
        resume = argv[argv.index("--resume") + 1]
    if resume is None or not os.path.isfile(resume):
        return tyro.cli(Args, args=argv)
    stored = load_checkpoint(resume, "cpu")["args"]
    try:
        default = Args(**{**stored, "resume": resume})
    except TypeError as e:  # e.g. a checkpoint of another script, with other arguments
        raise UsageError(f"'{resume}' was not written by this script ({e})") from e
    args = tyro.cli(Args, args=argv, default=default)
    return Args(**{f.name: getattr(args, f.name) for f in fields(Args) if f.init})  # recompute derived sizes


if __name__ == "__main__":
    try:
        summary = main(parse_args())
    except (UsageError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    sys.exit(130 if summary["status"] == "interrupted" else 0)  # 130: the shell's code for Ctrl-C
