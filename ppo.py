"""PPO for discrete actions and vector observations: the reference script of this repository.

Adds over reinforce_baseline.py: many environments stepped in lock-step for a fixed number of steps
(not whole episodes), generalised advantage estimation (GAE), and the clipped surrogate objective,
which lets every batch be reused for several epochs of minibatch updates.

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
Details: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization"
(https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/); defaults are CleanRL's
`ppo.py` for classic control.

Run:    python ppo.py --env-id CartPole-v1 --seed 1
Expect: CartPole-v1 reaches the 500-step limit; the mean of the last 100 episode returns after the
        default 500k steps is in the README's results table (measured, with the command).
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
    torch_threads: int = 1
    """CPU threads for torch; 1 is fastest for these small networks (README, speed section)"""
    pin_cpu: bool = True
    """on CPU, run the whole process (envpool's workers too) on the core it starts on (README, Speed)"""
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
    env_id: str = "CartPole-v1"
    """the id of the environment: a gymnasium id, `module:EnvId`, or an envpool id"""
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"
    """`auto` uses envpool when it has the id, gymnasium otherwise"""
    total_timesteps: int = 500_000
    """total environment steps, summed over environments"""
    learning_rate: float = 2.5e-4
    """the learning rate of the Adam optimizer (typical 1e-4 to 1e-3)"""
    num_envs: int = 4
    """the number of parallel environments"""
    num_steps: int = 128
    """the number of steps per environment in each rollout"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0 over the run"""
    gamma: float = 0.99
    """the discount factor (0.9 to 0.999)"""
    gae_lambda: float = 0.95
    """the lambda of generalised advantage estimation (0.9 to 1; 1 gives Monte Carlo advantages)"""
    num_minibatches: int = 4
    """the number of minibatches each batch is split into"""
    update_epochs: int = 4
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
    bootstrap_truncation: bool = True
    """bootstrap a time-limit truncation from V(final observation); off treats it as a termination (classic)"""
    eval_episodes: int = 0
    """episodes of greedy play (argmax action) after training, logged as eval/episodic_return"""
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
def make_env(env_id: str, num_envs: int, seed: int, backend: str = "auto"):
    """Vectorised environments, seeded, with the next-step autoreset of envpool and gymnasium >= 1.0.

    When an episode ends at step t, the observation returned by step t is the FINAL observation of that
    episode; step t+1 ignores its action, resets, and returns reward 0 with the first observation of the
    next episode. The training loop relies on exactly this, on both backends.
    """
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
        return envs

    try:
        envs = gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP},
        )
    except gym.error.Error as e:
        known = list(gym.registry) + list(envpool.list_all_envs())
        close = difflib.get_close_matches(env_id.split(":")[-1], known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown environment id '{env_id}'{hint}") from e
    except ImportError as e:
        raise UsageError(f"environment id '{env_id}': cannot import its module ({e})") from e
    envs.reset(seed=seed)  # seeds every sub-environment; later resets continue from these seeds
    envs.backend = "gymnasium"
    return envs


def check_spaces(envs):
    """ppo.py handles flat vector observations and discrete actions; say which script fits otherwise."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(
            f"ppo.py needs vector observations, this env has {obs_space}; use ppo_atari.py for "
            "(4, 84, 84) frames or ppo_procgen_impala.py for (64, 64, 3) images"
        )
    if not isinstance(act_space, gym.spaces.Discrete):
        raise UsageError(f"ppo.py needs discrete actions, this env has {act_space}; use ppo_continuous.py")


# ---------------------------------------------------------------------------------------------------------
# NETWORK
# ---------------------------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    """Orthogonal weights with gain `std` and constant bias, as in baselines' PPO (detail 2 of the 37)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate actor and critic MLPs (2 x 64 tanh). The policy head's 0.01 gain makes the initial
    policy close to uniform; the value head's gain is 1 (baselines' PPO)."""

    def __init__(self, observation_space, action_space):
        super().__init__()
        obs_dim = int(np.prod(observation_space.shape))
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, action_space.n), std=0.01),
        )

    def get_value(self, x):
        return self.critic(x).squeeze(-1)

    # The categorical distribution is written out (log-softmax, sampling, log-prob, entropy) instead of
    # building a torch.distributions.Categorical: with networks this small the object cost more than the
    # network (a rollout step 240 -> 160 us on the 2-core machine), and the formulas are worth seeing.
    def get_action(self, x):
        """Sample actions for acting: the rollout needs no entropy and no value (values come batched later)."""
        logits = self.actor(x)
        action = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
        logprob = logits.log_softmax(-1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
        return action, logprob

    def get_action_and_value(self, x, action=None):
        log_probs = self.actor(x).log_softmax(-1)  # log pi(a|s) for every action a
        if action is None:
            action = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
        logprob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, logprob, entropy, self.critic(x).squeeze(-1)

    def greedy_action(self, x):
        return self.actor(x).argmax(-1)


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


def save_checkpoint(path, agent, optimizer, args, global_step, iteration, episode_returns):
    """Everything needed to continue the run, written to a temporary file and renamed, so that a crash or
    Ctrl-C during the write never leaves a truncated checkpoint behind."""
    state = {
        "agent": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "args": {f.name: getattr(args, f.name) for f in fields(args) if f.init},
        "global_step": global_step,
        "iteration": iteration,
        "episode_returns": list(episode_returns),
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
            obs, reward, terminated, truncated, _ = env.step(action.item())
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
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
    envs = make_env(
        args.env_id, args.num_envs, args.seed + (ckpt["global_step"] if ckpt else 0), args.env_backend
    )
    check_spaces(envs)
    if args.capture_video:
        try:
            import moviepy  # noqa: F401  (gymnasium's RecordVideo writes with it)
        except ImportError as e:
            raise UsageError("--capture-video needs moviepy: pip install -e '.[video]'") from e
        try:  # render one frame now, so that a missing renderer is reported before training, not after
            probe_env = gym.make(args.env_id, render_mode="rgb_array")
            probe_env.reset(seed=args.seed)
            if probe_env.render() is None:
                raise ValueError("render() returned no frame")
            probe_env.close()
        except Exception as e:
            raise UsageError(f"--capture-video: cannot render '{args.env_id}' as rgb_array ({e})") from e

    agent = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    # eps=1e-5 as in baselines ppo2; fused=True: one kernel for all parameters (1.3 -> 1.1 ms a minibatch here)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    global_step, start_iteration = 0, 1
    episode_returns = deque(maxlen=100)  # the last 100 whole-episode returns, for the summary
    if ckpt:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
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
    print(f"run: {run_path}  env: {args.env_id} ({envs.backend})  device: {device}", flush=True)

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
    # (T, N, obs_dim)
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)  # (T, N)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)  # (T, N) log pi_old(a|s)
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
    next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
    next_autoreset = np.zeros(args.num_envs, dtype=bool)
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
        finished_returns, finished_lengths = [], []
        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            valid[step] = ~next_autoreset

            with torch.inference_mode():
                action, logprob = agent.get_action(next_obs)
            actions[step] = action
            logprobs[step] = logprob

            next_obs_np, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
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
            next_autoreset = ended

        episodes += len(finished_returns)
        episode_returns.extend(finished_returns)
        if finished_returns:
            writer.add_scalar("charts/episodic_return", np.mean(finished_returns), global_step)
            writer.add_scalar("charts/episodic_length", np.mean(finished_lengths), global_step)

        # ---- advantages ----
        with torch.no_grad():
            # V of every stored observation in one batched pass (128x fewer calls than one per step)
            values = agent.get_value(obs)
            next_value = agent.get_value(next_obs)
            # obs[t + 1] is the observation returned by step t: with next-step autoreset it is the true
            # next state, the final observation when step t ended an episode.
            next_values = torch.cat([values[1:], next_value[None]])
            b_rewards, b_terminations, b_dones = (
                torch.as_tensor(x, device=device) for x in (rewards, terminations, dones)
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
            save_checkpoint(checkpoint_path, agent, optimizer, args, global_step, iteration, episode_returns)
        if interrupted:
            status = "interrupted"
            break

    bar.close()
    signal.signal(signal.SIGINT, previous_handler)
    envs.close()

    if status == "non-finite loss":
        writer.close()
        kept = f"; the last good checkpoint is {checkpoint_path}" if os.path.exists(checkpoint_path) else ""
        raise FloatingPointError(
            f"non-finite loss at iteration {iteration} (global step {global_step}): stopped{kept}"
        )
    if args.save_model or status == "interrupted":
        save_checkpoint(checkpoint_path, agent, optimizer, args, global_step, iteration, episode_returns)

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
        "run_dir": run_path,
    }
    if status == "finished" and (args.eval_episodes > 0 or args.capture_video):
        video_folder = os.path.join(run_path, "videos") if args.capture_video else None
        eval_returns = evaluate(
            agent, args.env_id, max(1, args.eval_episodes), args.seed, device, video_folder
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
