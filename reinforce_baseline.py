"""REINFORCE with a learned baseline: the policy gradient with G_t - V(s_t) in place of G_t.

Adds over reinforce.py: a separate value network V(s), fitted by mean squared error to the rewards-to-go of
each batch (`--value-epochs` gradient steps after the policy's one step; with one, V lags far behind), and
the advantage A_t = G_t - V(s_t) in the policy loss -mean(log pi(a_t|s_t) * A_t). Any function of the state
alone can be subtracted from G_t without changing the expected gradient (because E[grad log pi(a|s)] = 0),
but a good one removes most of G_t's variance: the part explained by where the agent is rather than by what
it did. V(s) also lets a time-limit truncation be bootstrapped: the reward-to-go of a truncated episode
continues with V(final observation) instead of stopping at 0.

The action space decides the policy: a Categorical over the actions for Discrete spaces; for Box spaces a
diagonal Gaussian whose mean is a network output and whose log-std is a learned vector that does not depend
on the state. Bounded actions: the sampled action is used, unclipped, for log pi(a|s), and the environment
receives it clipped into the bounds. Clipping is part of the environment, not of the policy, so the
log-probability of what the policy actually sampled is the right one for the gradient; the clipped action's
own density would put a point mass at the bounds that the Gaussian does not have. Alternatives: squash with
tanh and correct the log-prob with the Jacobian (as SAC does), or use a Beta distribution on the bounded
interval (Chou et al. 2017); both change the policy family, clipping does not.

Papers: Williams 1992, "Simple statistical gradient-following algorithms for connectionist reinforcement
learning" (baselines: section 4); Sutton & Barto, "Reinforcement Learning: An Introduction", 2nd ed.,
chapter 13 (13.4: REINFORCE with baseline).

Run:    python reinforce_baseline.py --env-id CartPole-v1 --seed 1
Expect: CartPole-v1 learns faster and with less spread across seeds than reinforce.py (README, results).

Read top to bottom: Args, ENVIRONMENT, NETWORK, ALGORITHM, then train(): the whole algorithm. Below the
RUN HARNESS fence: checkpoints, signals, logging set-up and the command line, the same in every script.
"""

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn


# ----------------------------------------------- ARGUMENTS -----------------------------------------------
@dataclass
class Args:
    env_id: str = "CartPole-v1"  # the id of the environment: a gymnasium id, `module:EnvId`, or an envpool id
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"  # auto = envpool if it has the id
    total_timesteps: int = 500_000  # total environment steps, summed over envs (the last batch may pass it)
    learning_rate: float = 2e-3  # the learning rate of the Adam optimizer (typical 3e-4 to 3e-3)
    num_envs: int = 4  # the number of parallel environments that play episodes
    batch_size: int = 2048  # the least number of steps of complete episodes in a batch (one update each)
    anneal_lr: bool = False  # linearly anneal the learning rate to 0 over the run
    gamma: float = 0.99  # the discount factor (0.9 to 0.999)
    norm_adv: bool = True  # standardise the advantages G - V(s) over the batch (mean 0, std 1)
    value_epochs: int = 20  # full-batch steps that fit V(s) to the returns, after the policy step (5 to 80)
    bootstrap_truncation: bool = True  # bootstrap time-limit ends from V(final obs); off: as terminations
    max_grad_norm: Optional[float] = None  # clip the gradient norm to this (0.5 to 10); None: no clipping

    # Running, saving and logging
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the experiment's name, part of the run name
    seed: int = 1  # seed of the experiment (torch, numpy, python and the environments)
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, use CUDA when it is available
    torch_threads: int = 1  # CPU threads for torch; 1 is fastest for these small networks (README, Speed)
    pin_cpu: bool = True  # on CPU, with one torch thread: keep the process and envpool's workers on one core
    eval_episodes: int = 0  # episodes of greedy play after training, logged as eval/episodic_return
    capture_video: bool = False  # record the evaluation episodes (at least one) to <run>/videos
    save_model: bool = False  # write <run>/checkpoint.pt every --save-interval iterations and at the end
    save_interval: int = 25  # iterations between checkpoints with `--save-model`
    resume: Optional[str] = None  # a checkpoint to continue from; its args are the defaults, flags override
    eval_checkpoint: Optional[str] = None  # evaluate this checkpoint and exit (--eval-episodes, 0 means 10)
    run_dir: str = "runs"  # directory that holds one sub-directory per run
    progress: bool = True  # print a line (step, return, SPS) every tenth of the budget
    track: bool = False  # if toggled, also log to Weights & Biases (imported only then)
    wandb_project_name: str = "rl-scripts"  # the W&B project name
    wandb_entity: Optional[str] = None  # the W&B entity (team or user); None uses your default

    def __post_init__(self):
        check_args(self)  # the ranges of all flags (in the harness below)
        if self.total_timesteps < self.batch_size:
            raise UsageError(
                f"--total-timesteps {self.total_timesteps} is less than one batch ({self.batch_size} steps)"
            )


# ---------------------------------------------- ENVIRONMENT ----------------------------------------------
def make_env(env_id: str, num_envs: int, seed: int, backend: str = "auto"):
    """Vectorised environments, seeded, with the next-step autoreset of envpool and gymnasium >= 1.0.

    When an episode ends at step t, the observation returned by step t is the FINAL observation of that
    episode; step t+1 ignores its action, resets, and returns reward 0 with the first observation of the
    next episode. The training loop relies on exactly this, on both backends.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        import envpool  # here, so that importing this script does no work; it prints old gym's notice
    # one envpool worker per core this process may use, at most one per env (its default counts the cores of
    # the machine, not those of a pinned process, whose threads on one core only take turns)
    cores = min(num_envs, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else 0

    if backend == "envpool" or (backend == "auto" and env_id in envpool.list_all_envs()):
        if env_id not in envpool.list_all_envs():
            raise UsageError(f"envpool has no environment '{env_id}'")
        # envpool's float64 Box bounds make gymnasium warn each time it builds the spaces
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*precision lowered.*")
            envs = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=seed, num_threads=cores)
            envs.single_observation_space = envs.observation_space
            envs.single_action_space = envs.action_space
        envs.num_envs = num_envs
        envs.backend = "envpool"
        return envs

    try:
        envs = gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP},
        )
    except gym.error.Error as e:
        raise unknown_env_id(env_id, list(gym.registry) + list(envpool.list_all_envs())) from e
    except ImportError as e:
        raise UsageError(f"environment id '{env_id}': cannot import its module ({e})") from e
    envs.reset(seed=seed)  # seeds every sub-environment; later resets continue from these seeds
    envs.backend = "gymnasium"
    return envs


def check_spaces(envs):
    """reinforce_baseline.py handles vector observations, discrete or Box actions; say what fits otherwise."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(
            f"reinforce_baseline.py needs vector observations, this env has {obs_space}; use ppo_atari.py "
            "for (4, 84, 84) frames or ppo_procgen_impala.py for (64, 64, 3) images"
        )
    if not isinstance(act_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise UsageError(f"reinforce_baseline.py needs Discrete or Box actions, this env has {act_space}")


def env_actions(actions, action_space):
    """What the environment receives: integers for Discrete spaces; for Box spaces the Gaussian sample
    clipped into the bounds (the unclipped sample is what the log-probability uses, see the docstring)."""
    actions = actions.cpu().numpy()
    if isinstance(action_space, gym.spaces.Box):
        return np.clip(actions, action_space.low, action_space.high)
    return actions


def check_render(args):
    """--capture-video: render one frame now, so that a missing renderer is reported before training."""
    try:
        env = gym.make(args.env_id, render_mode="rgb_array")
        env.reset(seed=args.seed)
        if env.render() is None:
            raise ValueError("render() returned no frame")
        env.close()
    except Exception as e:
        raise UsageError(f"--capture-video: cannot render '{args.env_id}' as rgb_array ({e})") from e


def evaluate(agent, env_id, episodes, seed, device, video_folder=None):
    """Play `episodes` whole episodes with the greedy policy on a fresh gymnasium environment."""
    env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
    if video_folder:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda e: True, disable_logger=True)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            with torch.inference_mode():
                action = agent.greedy_action(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
            obs, reward, terminated, truncated, _ = env.step(env_actions(action, env.action_space)[0])
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


# ------------------------------------------------ NETWORK ------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    """Orthogonal weights with gain `std` and constant bias, as in baselines' PPO (detail 2 of the 37)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def gaussian_logprob(action, mean, std):
    """log N(a; mean, std) of a diagonal Gaussian, summed over the independent action dimensions."""
    return (-((action - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * np.log(2 * np.pi)).sum(-1)


class Agent(nn.Module):
    """The policy: an MLP (2 x 64 tanh) that outputs the logits of a Categorical (Discrete actions) or the
    mean of a diagonal Gaussian with a state-independent, learned log-std initialised to 0 (Box actions).
    The output layer's 0.01 gain starts the policy close to uniform, or to mean 0."""

    def __init__(self, observation_space, action_space):
        super().__init__()
        obs_dim = int(np.prod(observation_space.shape))
        self.continuous = isinstance(action_space, gym.spaces.Box)
        out_dim = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        # the baseline V(s): a separate MLP of the same shape, its output layer's gain 1
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        policy = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, out_dim), std=0.01),
        )
        if self.continuous:
            self.actor_mean = policy
            self.actor_logstd = nn.Parameter(torch.zeros(1, out_dim))
        else:
            self.actor = policy

    def get_value(self, x):
        return self.critic(x).squeeze(-1)

    def get_action(self, x):
        """Acting: (action, log pi(a|s), value). The value is None: the policy has no value head
        (reinforce_baseline.py's V(s) is a separate network, applied to the whole batch after the rollout)."""
        if self.continuous:
            mean = self.actor_mean(x)
            std = self.actor_logstd.expand_as(mean).exp()
            action = mean + std * torch.randn_like(mean)
            return action, gaussian_logprob(action, mean, std), None
        log_probs = self.actor(x).log_softmax(-1)  # log pi(a|s) for every action a
        action = (log_probs.exp() / torch.empty_like(log_probs).exponential_()).argmax(-1)  # Gumbel-max
        return action, log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1), None

    def get_logprob_and_entropy(self, x, action):
        """The update: (log pi(a|s) of the given actions, the entropy of pi(.|s))."""
        if self.continuous:
            mean = self.actor_mean(x)
            std = self.actor_logstd.expand_as(mean).exp()
            entropy = (0.5 + 0.5 * np.log(2 * np.pi) + std.log()).sum(-1)
            return gaussian_logprob(action, mean, std), entropy
        log_probs = self.actor(x).log_softmax(-1)
        logprob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return logprob, entropy

    def greedy_action(self, x):
        """The most likely action: the argmax, or the Gaussian's mean."""
        return self.actor_mean(x) if self.continuous else self.actor(x).argmax(-1)


# -------------- ALGORITHM (pure functions: tensors in, tensors out; the tests import them) ---------------
def discounted_returns(rewards, dones, gamma):
    """Rewards-to-go G_t = r_t + gamma * (1 - dones_t) * G_{t+1}, all arguments (num_steps, num_envs).

    dones[t] = 1 when step t ended an episode (termination or truncation), so G never reaches across
    episodes. After the last step, G is 0: the returns of episodes still running at the end are incomplete.
    """
    returns = torch.zeros_like(rewards)
    next_return = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        next_return = rewards[t] + gamma * (1.0 - dones[t]) * next_return
        returns[t] = next_return
    return returns


def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1 (0 if there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_mean_std(x, mask):
    """Mean and population std of x over the valid entries."""
    mean = masked_mean(x, mask)
    return mean, masked_mean((x - mean) ** 2, mask).sqrt()


def normalize(x, mask):
    """x shifted and scaled to mean 0 and std 1 over the valid entries (population std: one entry gives 0)."""
    mean, std = masked_mean_std(x, mask)
    return (x - mean) / (std + 1e-8)


def explained_variance(y_pred, y_true):
    """1 - Var[y_true - y_pred] / Var[y_true]: 1 is a perfect value function, 0 is no better than the mean,
    negative is worse. NaN when Var[y_true] is 0 (constant returns): it is undefined there."""
    var_y = torch.var(y_true, correction=0)
    ev = 1.0 - torch.var(y_true - y_pred, correction=0) / var_y
    return torch.where(var_y > 0, ev, torch.full_like(ev, float("nan")))


def reinforce_loss(logprob, advantages, entropy, mask):
    """-mean(log pi(a|s) * A) over the valid steps: its gradient is the REINFORCE estimate of -grad J, with
    A = G (reinforce.py) or G - V(s) (reinforce_baseline.py). Returns the loss and a dict of 0-dim tensors
    for logging."""
    weights = mask / mask.sum().clamp(min=1.0)  # mean over the valid steps = weighted sum
    pg_loss = -(logprob * advantages * weights).sum()
    stats = {"policy_loss": pg_loss.detach(), "entropy": (entropy * weights).sum().detach()}
    return pg_loss, stats


def value_loss(newvalue, returns, mask):
    """0.5 * mean((V(s) - G)^2) over the valid steps."""
    weights = mask / mask.sum().clamp(min=1.0)
    return 0.5 * ((newvalue - returns) ** 2 * weights).sum()


# ----------------------------------------------- TRAINING ------------------------------------------------
def train(args: Args, run):
    """As reinforce.py, with A = G - V(s) in the policy step and a fit of V(s) to the returns after it."""
    device = run.device
    # a resumed run seeds its environments afresh, so that it does not replay the episodes it started with
    envs = make_env(args.env_id, args.num_envs, args.seed + run.global_step, args.env_backend)
    check_spaces(envs)
    if args.capture_video:
        check_render(args)
    agent = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    # eps=1e-5 as in baselines ppo2; fused=True: one kernel updates every parameter
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    # what a checkpoint holds: --resume and --eval-checkpoint restore it, --save-model writes it
    run.start(args.total_timesteps, {"backend": envs.backend}, agent=agent, optimizer=optimizer)

    action_space = envs.single_action_space
    global_step = run.global_step

    for iteration in run.iterations():
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = run.annealed(args.learning_rate)

        # ---- rollout: play until the complete episodes hold at least batch_size steps ----
        # Every batch starts from fresh episodes, so that all its actions come from the current policy.
        # Once it is full, no env starts a new episode, but the episodes running then play to their end:
        # dropping them would drop long episodes more often than short ones (a long one is more likely to
        # be running at the cut) and bias the gradient and the logged returns towards short episodes.
        next_obs_np, _ = envs.reset()
        next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
        next_autoreset = np.zeros(args.num_envs, dtype=bool)
        episode_return = np.zeros(args.num_envs, dtype=np.float64)
        episode_length = np.zeros(args.num_envs, dtype=np.int64)
        # Lists of per-step arrays, stacked into (T, N, ...) after the rollout: T is not known in advance.
        obs, actions, rewards, terminations, dones, valid = [], [], [], [], [], []
        finished_returns, finished_lengths = [], []
        collecting = np.ones(args.num_envs, dtype=bool)  # envs whose current episode is in the batch
        complete_steps = 0
        while collecting.any():
            global_step += args.num_envs  # steps of envs that have stopped count, but are not in the batch
            obs.append(next_obs)
            valid.append(collecting & ~next_autoreset)

            with torch.inference_mode():
                action, _, _ = agent.get_action(next_obs)
            actions.append(action)

            next_obs_np, reward, terminated, truncated, _ = envs.step(env_actions(action, action_space))
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
            ended = terminated | truncated
            rewards.append(reward)
            dones.append(ended)
            # THE termination / truncation decision: by default the reward-to-go of a time-limit truncation
            # continues with V(final observation); --no-bootstrap-truncation treats it as a termination.
            terminations.append(terminated if args.bootstrap_truncation else ended)

            # Episode accounting: the autoreset step is not part of any episode.
            episode_return += reward
            episode_length += ~next_autoreset
            for i in np.flatnonzero(ended & collecting):
                finished_returns.append(float(episode_return[i]))
                finished_lengths.append(int(episode_length[i]))
                complete_steps += int(episode_length[i])
            if complete_steps >= args.batch_size:
                collecting &= ~ended  # full: an env whose episode has ended starts no new one in this batch
            episode_return[ended] = 0.0
            episode_length[ended] = 0
            next_autoreset = ended
        run.log_episodes(global_step, finished_returns, finished_lengths)

        # ---- returns ----
        obs = torch.stack(obs)  # (T, N, obs_dim)
        actions = torch.stack(actions)  # (T, N) or (T, N, act_dim)
        rewards, terminations, dones, valid = (
            torch.as_tensor(np.stack(x), dtype=torch.float32, device=device)
            for x in (rewards, terminations, dones, valid)
        )  # (T, N) each
        with torch.no_grad():
            values = agent.get_value(obs)  # (T, N), the baseline, before the update
            # obs[t + 1] is the observation returned by step t: the final observation when step t ended an
            # episode. A truncation adds gamma * V(final observation) to its reward, so G continues there.
            next_values = torch.cat([values[1:], agent.get_value(next_obs)[None]])
            truncations = dones - terminations
            returns = discounted_returns(rewards + args.gamma * truncations * next_values, dones, args.gamma)
        mask = valid  # the batch: every step of an episode that ended in it, no autoreset step
        returns_mean, returns_std = masked_mean_std(returns, mask)
        advantages = returns - values
        valid_adv = advantages[mask.bool()]
        if args.norm_adv:
            advantages = normalize(advantages, mask)

        # ---- update: one gradient step on the whole batch ----
        logprob, entropy = agent.get_logprob_and_entropy(obs, actions)
        loss, stats = reinforce_loss(logprob, advantages, entropy, mask)
        optimizer.zero_grad()
        loss.backward()
        max_norm = args.max_grad_norm if args.max_grad_norm is not None else float("inf")
        stats["grad_norm"] = nn.utils.clip_grad_norm_(agent.parameters(), max_norm)
        optimizer.step()

        # ---- fit the baseline to this batch's returns, for the next batch ----
        # The advantages above used V from before this fit: a baseline fitted to the very returns it is
        # subtracted from would depend on the actions taken and bias the gradient. zero_grad() leaves the
        # actor's gradients None, and Adam skips parameters without a gradient: these steps move V only.
        v_loss_sum = torch.zeros((), device=device)
        for _ in range(args.value_epochs):
            v_loss = value_loss(agent.get_value(obs), returns, mask)
            optimizer.zero_grad()
            v_loss.backward()
            nn.utils.clip_grad_norm_(agent.critic.parameters(), max_norm)
            optimizer.step()
            v_loss_sum += v_loss.detach()
        stats["value_loss"] = v_loss_sum / args.value_epochs

        # ---- logging ----
        means = {k: v.item() for k, v in stats.items()}
        if not all(np.isfinite(v) for v in means.values()):
            raise RunFailed("non-finite loss", f"non-finite loss at iteration {iteration}")
        metrics = {"charts/learning_rate": optimizer.param_groups[0]["lr"]}
        metrics["losses/policy_loss"] = means["policy_loss"]
        metrics["losses/value_loss"] = means["value_loss"]
        metrics["losses/entropy"] = means["entropy"]
        ev = explained_variance(values[mask.bool()], returns[mask.bool()]).item()
        metrics["losses/explained_variance"] = ev
        metrics["debug/residual_variance"] = 1.0 - ev
        metrics["debug/advantage_mean"] = valid_adv.mean().item()
        metrics["debug/advantage_std"] = valid_adv.std(correction=0).item()
        if not agent.continuous and action_space.n > 1:  # undefined with a single action (probes 1-3)
            metrics["debug/relative_entropy"] = means["entropy"] / np.log(action_space.n)
        metrics["debug/return_mean"] = returns_mean.item()
        metrics["debug/return_std"] = returns_std.item()
        metrics["debug/grad_norm"] = means["grad_norm"]
        metrics["debug/discarded_fraction"] = 1.0 - mask.sum().item() / mask.numel()
        run.log(global_step, metrics)

    envs.close()
    run.evaluate(
        lambda episodes, video_folder: evaluate(agent, args.env_id, episodes, args.seed, device, video_folder)
    )


# ============================================ RUN HARNESS ============================================
# No RL below: checks, seeds, checkpoints, logs, signals, the JSON summary; the same bytes in every script.
import argparse
import ctypes
import difflib
import importlib
import json
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import fields

import tyro

SCRIPT = os.path.basename(__file__)
CHECKPOINT = {"format": "rl-scripts checkpoint v4", "script": SCRIPT}  # and what save_checkpoint() adds
RULES = [  # (what the value must be, its test, the fields; each script has some of them): finite numbers
    ("≥ 1", lambda v: 1 <= v < np.inf, "num_envs num_steps num_minibatches update_epochs value_epochs"),
    ("≥ 1", lambda v: 1 <= v < np.inf, "torch_threads save_interval total_timesteps batch_size"),
    ("≥ 0", lambda v: 0 <= v < np.inf, "eval_episodes num_test_envs num_levels start_level ent_coef vf_coef"),
    ("in [0, 1]", lambda v: 0 <= v <= 1, "gamma gae_lambda"),
    ("> 0", lambda v: 0 < v < np.inf, "learning_rate value_learning_rate clip_coef max_grad_norm target_kl"),
]


class UsageError(Exception):
    """Bad input (a flag, an environment id, a checkpoint): one line on stderr, exit 1, nothing written."""


class RunFailed(Exception):
    """RunFailed(status, message): a run that cannot go on; `status` becomes the summary's status."""


def check_args(args):  # the ranges in RULES
    for rule, test, name in ((rule, test, name) for rule, test, names in RULES for name in names.split()):
        if (v := getattr(args, name, None)) is not None and not test(v):  # (None: off)
            raise UsageError(f"--{name.replace('_', '-')} must be {rule}, got {v}")
    if args.resume is not None and args.eval_checkpoint is not None:
        raise UsageError("--resume and --eval-checkpoint exclude each other (continue training, or evaluate)")


def unknown_env_id(env_id: str, known) -> UsageError:
    close = ", ".join(dict.fromkeys(difflib.get_close_matches(env_id.split(":")[-1], known, n=3)))
    return UsageError(f"unknown environment id '{env_id}'" + (f"; did you mean {close}?" if close else ""))


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


def load_checkpoint(path: str) -> dict:  # plain data: weights_only=True refuses (never runs) any object
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # (an object other than tensors and data is refused: "Weights only load failed")
        raise UsageError(f"cannot read checkpoint '{path}': {one_line(e)}") from e
    if not isinstance(ckpt, dict) or any(ckpt.get(k) != v for k, v in CHECKPOINT.items()):
        raise UsageError(f"'{path}' is not a complete checkpoint of {SCRIPT} (of this version)")
    return ckpt


class Run:  # train()'s calls first, then the internals (ppo_atari_multigpu.py's DataParallel overrides some)
    def __init__(self, args):
        self.args, cuda = args, args.cuda and torch.cuda.is_available()
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "DataParallel" not in globals():
            raise UsageError(f"{SCRIPT} runs in one process; ppo_atari_multigpu.py is the one for torchrun")
        if args.capture_video and importlib.util.find_spec("moviepy") is None:
            raise UsageError("--capture-video needs moviepy: pip install -e '.[video]'")
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # videos render off-screen, with no display
        warnings.filterwarnings("ignore", "pkg_resources is deprecated")  # moviepy's ffmpeg helper, on import
        self.checkpoint = ckpt = load_checkpoint(p) if (p := args.resume or args.eval_checkpoint) else {}
        self.cpu_core, self.device = None, torch.device("cuda" if cuda else "cpu")
        if sys.platform == "linux":  # keep up to 1 GiB of freed memory: big tensors are not faulted in anew
            (libc := ctypes.CDLL(None)).mallopt(-2, 1 << 30)  # glibc's M_TOP_PAD (docs/results.md, Speed)
            if args.pin_cpu and not cuda and args.torch_threads == 1:  # --pin-cpu (two threads would spin)
                self.cpu_core = libc.sched_getcpu()  # this and every later thread stay on the core it runs on
                os.sched_setaffinity(0, {self.cpu_core})
        torch.set_num_threads(args.torch_threads)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        self.global_step, self.iteration = ckpt.get("global_step", 0), ckpt.get("iteration", 0)
        for seed in (random.seed, np.random.seed, torch.manual_seed):  # a resume draws afresh, as its envs do
            seed(args.seed + self.global_step)
        self.episodes = dict(ckpt.get("episodes", {}))  # {prefix: count}; "" is training, "test_" ...
        self.returns = dict(ckpt.get("returns", {}))  # {prefix: the last 100 returns}
        self.path = self.writer = self.summary = self.stop_signal = self.error = self.sps = None
        self.status, self.phase, self.evaluation = "finished", "start", {}
        self.config = {f.name: getattr(args, f.name) for f in fields(args) if f.init}
        self.info, self.start_time, self.start_step = {}, time.time(), self.global_step

    def start(self, steps: int, info: dict, **state):
        """Restore the objects a checkpoint holds (state_dict, load_state_dict) and open the run directory."""
        self.steps, self.info, self.state, args = steps, dict(info), state, self.args
        for name, obj in state.items() if self.checkpoint else ():
            rates = [g["lr"] for g in getattr(obj, "param_groups", [])]  # the flags' rates, not the stored
            try:
                obj.load_state_dict(self.checkpoint[name])
            except (KeyError, ValueError, RuntimeError) as e:
                raise UsageError(f"the checkpoint does not fit this run's {name}: {one_line(e)}") from e
            for group, rate in zip(getattr(obj, "param_groups", []), rates, strict=True):
                group["lr"] = rate
        if not (args.eval_checkpoint or args.resume and self.global_step >= steps):  # (finished: untouched)
            self.open()
        self.start_time, self.start_step, self.next_print = time.time(), self.global_step, self.global_step

    def iterations(self):
        """1, 2, ... (on from a resume) until the budget is spent or a stop signal came; saves as asked."""
        while self.path and self.global_step < self.steps and not self.stopping():
            self.iteration, self.phase = self.iteration + 1, "iteration"
            yield self.iteration
            if self.args.save_model and self.iteration % self.args.save_interval == 0:
                self.save_checkpoint()
        if self.path and (self.global_step < self.steps or self.stop_signal):
            self.status = "interrupted"  # (a signal in the last iteration skips the evaluation too)

    def annealed(self, rate: float) -> float:  # linearly to 0 at the end of the budget
        return rate * (1.0 - self.global_step / self.steps)

    def log_episodes(self, global_step: int, returns: list, lengths: list = None, prefix: str = ""):
        """Episodes that ended in this iteration (`prefix` keeps a second kind apart, e.g. "test_")."""
        self.episodes[prefix] = self.episodes.get(prefix, 0) + len(returns)
        self.returns[prefix] = (self.returns.get(prefix, []) + [float(r) for r in returns])[-100:]
        for kind, values in (("return", returns), ("length", lengths or [])):
            if len(values):
                self.writer.add_scalar(f"charts/{prefix}episodic_{kind}", np.mean(values), global_step)

    def log(self, global_step: int, scalars: dict):  # an iteration's metrics; each tenth, the progress line
        self.global_step, seconds = global_step, max(time.time() - self.start_time, 1e-9)
        self.sps = sps = int((global_step - self.start_step) / seconds)
        for tag, value in {**scalars, "charts/SPS": sps}.items():
            self.writer.add_scalar(tag, value, global_step)
        if self.args.progress and global_step >= self.next_print:
            self.next_print = global_step + self.steps / 10
            recent = np.mean(self.returns[""]) if self.returns.get("") else float("nan")
            print(f"step {global_step:>10}  return(last100) {recent:8.2f}  SPS {sps}", flush=True)

    def evaluate(self, play):
        """Save the run, then play(episodes, video_folder) greedy episodes; a stop signal ends them."""
        args, self.phase = self.args, "evaluation"
        self.save()
        episodes = args.eval_episodes or (10 if args.eval_checkpoint else int(args.capture_video))
        if self.status != "finished" or episodes == 0:
            return
        where = self.path or os.path.dirname(os.path.abspath(args.eval_checkpoint))
        returns = play(episodes, os.path.join(where, "videos") if args.capture_video else None)
        self.evaluation = dict(eval_episodes=len(returns), eval_return_mean=float(np.mean(returns)))
        self.evaluation["eval_return_std"] = float(np.std(returns))
        for i, r in enumerate(returns if self.writer else []):
            self.writer.add_scalar("eval/episodic_return", r, i)

    def stopping(self) -> bool:
        return self.stop_signal is not None

    def open(self):
        args = self.args
        if args.resume:
            path = os.path.dirname(os.path.abspath(args.resume))
        else:
            name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
            path = os.path.join(args.run_dir, re.sub(r"[^A-Za-z0-9_.\-]", "-", name))
            path += f"-{os.getpid()}" if os.path.exists(path) else ""  # another run started in this second
        try:
            os.makedirs(path, exist_ok=bool(args.resume))
            self.path, name = path, f"args-{self.global_step}.json" if args.resume else "args.json"
            self.write(name, json.dumps(self.config))
        except (OSError, RunFailed) as e:
            raise UsageError(f"--run-dir: cannot create '{path}': {getattr(e, 'strerror', e)}") from e
        if args.track:
            try:
                where = dict(project=args.wandb_project_name, entity=args.wandb_entity, dir=path)
                wandb = importlib.import_module("wandb")
                wandb.init(**where, name=os.path.basename(path), config=self.config, sync_tensorboard=True)
            except Exception as e:  # e.g. not logged in: `wandb login`, or WANDB_MODE=offline
                raise UsageError(f"--track: W&B did not start: {one_line(e)}") from e
        self.writer = importlib.import_module("torch.utils.tensorboard").SummaryWriter(path)
        info = "".join(f"  {k}: {v}" for k, v in {**self.info, "budget": self.steps}.items())
        print(f"run: {self.path}  env: {args.env_id}{info}  device: {self.device}", flush=True)

    def write(self, name: str, data: str | bytes):  # atomic: a complete name.tmp, renamed to name
        path = os.path.join(self.path, name)
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.replace(path + ".tmp", path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            raise RunFailed((e.strerror or "write error").lower(), f"{e.strerror}: {path}") from e

    def save_checkpoint(self):
        ckpt = {**CHECKPOINT, "args": self.config, "episodes": self.episodes, "returns": self.returns}
        ckpt.update(global_step=self.global_step, iteration=self.iteration)
        torch.save({**ckpt, **{k: v.state_dict() for k, v in self.state.items()}}, buffer := io.BytesIO())
        self.write("checkpoint.pt", buffer.getvalue())

    def save(self, healthy=True):  # summary.json, after the checkpoint (--save-model, a signal, a resume)
        args, mean = self.args, lambda returns: float(np.mean(returns)) if returns else None
        summary = dict(env_id=args.env_id, seed=args.seed, global_step=self.global_step, status=self.status)
        for prefix in sorted(self.returns | {"": []}):  # "" (training) first, then e.g. "test_"
            summary[f"{prefix}episodes"] = self.episodes.get(prefix, 0)
            summary[f"{prefix}episodic_return_mean_last100"] = mean(self.returns.get(prefix))
        summary.update(sps=self.sps, wall_seconds=round(time.time() - self.start_time, 2), **self.info)
        summary.update(cpu_core=self.cpu_core, run_dir=self.path, checkpoint=args.eval_checkpoint)
        summary.update(**self.evaluation, error=self.error, signal=self.stop_signal and self.stop_signal.name)
        # strict JSON for every parser: a NaN or infinite number (the returns of NaN rewards) is null
        nonfinite = [k for k, v in summary.items() if isinstance(v, float) and not np.isfinite(v)]
        self.summary = {**summary, **dict.fromkeys(nonfinite)}
        healthy = healthy and self.path and self.status in ("finished", "interrupted")  # (not mid-iteration)
        if healthy and (args.save_model or args.resume or self.stop_signal):
            self.save_checkpoint()
        if self.path:
            self.write("summary.json", json.dumps(self.summary, indent=2))

    def on_signal(self, signum: int, frame=None):
        """The first SIGINT or SIGTERM stops after this iteration; a second, or one in evaluation, at once."""
        first, self.stop_signal = self.stop_signal is None, self.stop_signal or signal.Signals(signum)
        if self.phase != "closing" and (not first or self.phase == "evaluation"):  # (closing: only recorded)
            raise KeyboardInterrupt(self.stop_signal.name)
        name = self.stop_signal.name  # os.write, not print: the signal may have come inside a print
        os.write(2, f"\n{name}: finishing this iteration, then saving ({name} again quits)\n".encode())

    def close(self):  # the end, whatever happened: checkpoint, summary.json, logs, the JSON line (last)
        healthy, self.phase = self.phase != "iteration", "closing"
        try:
            self.save(healthy)
        except RunFailed as e:  # e.g. a full disk: summary.json, if it can, with the status that says why
            self.status, self.error = e.args
            with contextlib.suppress(RunFailed):
                self.save()
        if self.error:
            print(f"error: {self.error}", file=sys.stderr, flush=True)
        if self.writer:
            self.writer.close()
        if self.writer and self.args.track:
            importlib.import_module("wandb").finish()
        print(json.dumps(self.summary, allow_nan=False), flush=True)


def main(args) -> dict:
    """train(args, run) in the harness: returns the summary, printed as the last stdout line."""
    # ppo_atari_multigpu.py defines a class DataParallel above its fence: mixed into Run, it runs torchrun
    run = (type("Run", (DataParallel, Run), {}) if "DataParallel" in globals() else Run)(args)  # noqa: F821
    handlers = {s: signal.signal(s, run.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(args, run)
    except RunFailed as e:
        run.status, run.error = e.args
    except KeyboardInterrupt as e:  # a second signal (no new checkpoint), or one during evaluation
        run.status, run.stop_signal = "interrupted", run.stop_signal or signal.SIGINT
        print(f"\n{e or 'SIGINT'}: stopped", file=sys.stderr, flush=True)
    except Exception as e:  # a usage error (nothing is left behind) or a bug, whose traceback follows
        run.status = "usage error" if isinstance(e, UsageError) else "crashed"
        raise
    finally:
        if run.status != "usage error":
            run.close()
        elif run.path and not args.resume:
            shutil.rmtree(run.path, ignore_errors=True)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return run.summary


def parse_args(argv=None) -> "Args":
    """tyro; with --resume or --eval-checkpoint, the stored arguments are the defaults that flags override."""
    find = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the checkpoint, before the checks
    find.add_argument("--resume")
    find.add_argument("--eval-checkpoint", "--eval_checkpoint")
    given = vars(find.parse_known_args(argv)[0])
    if not (path := given["resume"] or given["eval_checkpoint"]):
        return tyro.cli(Args, args=argv)
    if given["eval_checkpoint"]:  # an evaluation does not inherit the run's logging, saving or video
        given.update(track=False, save_model=False, capture_video=False)
    try:
        default = Args(**{**load_checkpoint(path)["args"], **given})
    except TypeError as e:
        raise UsageError(f"'{path}' holds arguments this script does not have ({e})") from e
    args = tyro.cli(Args, args=argv, default=default)
    return Args(**{f.name: getattr(args, f.name) for f in fields(Args) if f.init})  # recompute derived sizes


def cli() -> int:
    """Exit 0 when finished, 128 + the signal's number when stopped by one (130, 143), 1 on any failure."""
    try:
        summary = main(parse_args())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        summary = {"status": "usage error", "error": str(e)}
    except KeyboardInterrupt:  # before the run started: nothing to save
        summary = {"status": "interrupted", "signal": "SIGINT"}
    if "run_dir" not in summary:  # (a run prints its own)
        print(json.dumps(summary), flush=True)
    if summary["status"] == "interrupted":
        return 128 + signal.Signals[summary["signal"]].value
    return 0 if summary["status"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(cli())
