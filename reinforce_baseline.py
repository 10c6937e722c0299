"""REINFORCE with a learned baseline: the policy gradient with G_t - V(s_t) in place of G_t.

Adds over reinforce.py: a separate value network V(s), fitted by mean squared error to the rewards-to-go of
each batch (`--value-epochs` gradient steps after the policy's one step), and the advantage
A_t = G_t - V(s_t) in the policy loss -mean(log pi(a_t|s_t) * A_t). Any
function of the state alone can be subtracted from G_t without changing the expected gradient (because
E[grad log pi(a|s)] = 0), but a good one removes most of G_t's variance: the part explained by where the
agent is rather than by what it did. V(s) also lets a time-limit truncation be bootstrapped: the
reward-to-go of a truncated episode continues with V(final observation) instead of stopping at 0.

The action space decides the policy: a Categorical over the actions for Discrete spaces; for Box spaces a
diagonal Gaussian whose mean is a network output and whose log-std is a learned vector that does not depend
on the state. Bounded actions: the sampled action is used, unclipped, for log pi(a|s), and the environment
receives it clipped into the bounds. Clipping is part of the environment, not of the policy, so the
log-probability of what the policy actually sampled is the right one for the gradient; the clipped action's
own density would put a point mass at the bounds that the Gaussian does not have. Alternatives: squash with
tanh and correct the log-prob with the Jacobian (as SAC does), or use a Beta distribution on the bounded
interval (Chou et al. 2017); both change the policy family, clipping does not.

Papers: Williams 1992 (baselines are already in section 4); Sutton & Barto, "Reinforcement Learning: An
Introduction", 2nd ed., section 13.4 (REINFORCE with baseline).

Run:    python reinforce_baseline.py --env-id CartPole-v1 --seed 1
Expect: CartPole-v1 learns faster and with less spread across seeds than reinforce.py (README, results).
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
from dataclasses import asdict, dataclass, fields
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
    """total environment steps, summed over environments (the run stops at the first update past it)"""
    learning_rate: float = 2e-3
    """the learning rate of the Adam optimizer (typical 3e-4 to 3e-3)"""
    num_envs: int = 4
    """the number of parallel environments that play episodes"""
    batch_size: int = 2048
    """the least number of steps of complete episodes in one batch (one gradient step per batch)"""
    anneal_lr: bool = False
    """linearly anneal the learning rate to 0 over the run"""
    gamma: float = 0.99
    """the discount factor (0.9 to 0.999)"""
    norm_adv: bool = True
    """standardise the advantages G - V(s) over the batch (mean 0, std 1)"""
    value_epochs: int = 20
    """full-batch gradient steps that fit V(s) to each batch's returns, after the policy step (5 to 80);
    with one step V lags far behind the returns and subtracts almost nothing (explained variance ~0)"""
    bootstrap_truncation: bool = True
    """bootstrap a time-limit truncation from V(final observation); off treats it as a termination"""
    max_grad_norm: Optional[float] = None
    """clip the gradient norm to this value (0.5 to 10); None: no clipping, the plain algorithm"""
    eval_episodes: int = 0
    """episodes played after training with the most likely action (the mean for Gaussian policies),
    logged as eval/episodic_return"""

    def __post_init__(self):
        for name in ("num_envs", "batch_size", "value_epochs", "torch_threads", "save_interval"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise UsageError(f"--gamma must be in [0, 1], got {self.gamma}")
        if self.learning_rate <= 0:
            raise UsageError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise UsageError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.eval_episodes < 0:
            raise UsageError(f"--eval-episodes must be >= 0, got {self.eval_episodes}")
        if self.total_timesteps < self.batch_size:
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
    """reinforce_baseline.py handles vector observations, discrete or Box actions; say what fits otherwise."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(
            f"reinforce_baseline.py needs vector observations, this env has {obs_space}; use ppo_atari.py for "
            "(4, 84, 84) frames or ppo_procgen_impala.py for (64, 64, 3) images"
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


# ---------------------------------------------------------------------------------------------------------
# NETWORK
# ---------------------------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    """Orthogonal weights with gain `std` and constant bias, as in baselines' PPO (detail 2 of the 37)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The policy: an MLP (2 x 64 tanh) that outputs the logits of a Categorical (Discrete actions) or the
    mean of a diagonal Gaussian with a state-independent, learned log-std initialised to 0 (Box actions).
    The output layer's 0.01 gain starts the policy close to uniform, or to mean 0. The baseline V(s) is a
    separate MLP of the same shape (value head gain 1)."""

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
        self.continuous = isinstance(action_space, gym.spaces.Box)
        out_dim = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
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

    def get_action_and_logprob(self, x, action=None):
        """Sample an action (or take the given one); return it with log pi(a|s) and the entropy."""
        if self.continuous:
            mean = self.actor_mean(x)
            std = self.actor_logstd.expand_as(mean).exp()
            if action is None:
                action = mean + std * torch.randn_like(mean)
            # log N(a; mean, std), summed over the independent action dimensions
            logprob = (-((action - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * np.log(2 * np.pi)).sum(-1)
            entropy = (0.5 + 0.5 * np.log(2 * np.pi) + std.log()).sum(-1)
            return action, logprob, entropy
        log_probs = self.actor(x).log_softmax(-1)  # log pi(a|s) for every action a
        if action is None:
            action = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
        logprob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, logprob, entropy

    def greedy_action(self, x):
        """The most likely action: the argmax, or the Gaussian's mean."""
        return self.actor_mean(x) if self.continuous else self.actor(x).argmax(-1)


# ---------------------------------------------------------------------------------------------------------
# ALGORITHM (pure functions: tensors in, tensors out; the tests import them)
# ---------------------------------------------------------------------------------------------------------
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


def explained_variance(y_pred, y_true):
    """1 - Var[y_true - y_pred] / Var[y_true]: 1 is a perfect value function, 0 is no better than the mean,
    negative is worse. NaN when Var[y_true] is 0 (constant returns): it is undefined there."""
    var_y = torch.var(y_true, correction=0)
    ev = 1.0 - torch.var(y_true - y_pred, correction=0) / var_y
    return torch.where(var_y > 0, ev, torch.full_like(ev, float("nan")))


def complete_episode_mask(dones, valid):
    """1 for the steps that belong to an episode that ended within the rollout: valid (not an autoreset
    step) and at or before the last episode end of their environment. Steps of episodes still running at
    the end have incomplete returns and are left out."""
    num_steps = dones.shape[0]
    steps = torch.arange(num_steps, device=dones.device).unsqueeze(-1).expand_as(dones)
    last_end = torch.where(dones.bool(), steps, torch.full_like(steps, -1)).max(0).values
    return valid * (steps <= last_end).float()


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


def reinforce_loss(logprob, advantages, entropy, mask):
    """-mean(log pi(a|s) * A) over the valid steps: with A = G - V(s), the REINFORCE-with-baseline estimate
    of -grad J. Returns the loss and a dict of 0-dim tensors for logging."""
    weights = mask / mask.sum().clamp(min=1.0)  # mean over the valid steps = weighted sum
    pg_loss = -(logprob * advantages * weights).sum()
    stats = {"policy_loss": pg_loss.detach(), "entropy": (entropy * weights).sum().detach()}
    return pg_loss, stats


def value_loss(newvalue, returns, mask):
    """0.5 * mean((V(s) - G)^2) over the valid steps."""
    weights = mask / mask.sum().clamp(min=1.0)
    return 0.5 * ((newvalue - returns) ** 2 * weights).sum()


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
            obs, reward, terminated, truncated, _ = env.step(env_actions(action, env.action_space)[0])
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

    from tqdm import tqdm

    show_bar = args.progress and sys.stdout.isatty()
    bar = tqdm(total=args.total_timesteps, initial=global_step, unit="step", disable=not show_bar)
    start_time, start_step = time.time(), global_step
    action_space = envs.single_action_space
    episodes = 0
    iteration = start_iteration - 1
    status = "finished"

    while global_step < args.total_timesteps:
        iteration += 1
        if args.anneal_lr:
            frac = 1.0 - global_step / args.total_timesteps
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # ---- rollout: play until the complete episodes hold at least batch_size steps ----
        # Every batch starts from fresh episodes, so that all its actions come from the current policy.
        # Episodes still running when the batch is full are dropped (their steps count in global_step).
        next_obs_np, _ = envs.reset()
        next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
        next_autoreset = np.zeros(args.num_envs, dtype=bool)
        episode_return = np.zeros(args.num_envs, dtype=np.float64)
        episode_length = np.zeros(args.num_envs, dtype=np.int64)
        # Lists of per-step arrays, stacked into (T, N, ...) after the rollout: T is not known in advance.
        obs, actions, rewards, terminations, dones, valid = [], [], [], [], [], []
        finished_returns, finished_lengths = [], []
        complete_steps = 0
        while complete_steps < args.batch_size:
            global_step += args.num_envs
            obs.append(next_obs)
            valid.append(~next_autoreset)

            with torch.inference_mode():
                action, _, _ = agent.get_action_and_logprob(next_obs)
            actions.append(action)

            next_obs_np, reward, terminated, truncated, _ = envs.step(env_actions(action, action_space))
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
            ended = terminated | truncated
            rewards.append(reward)
            dones.append(ended)
            # THE termination / truncation decision. A time-limit truncation is not a true end: the final
            # observation still has value, so by default its reward-to-go continues with V(final
            # observation). --no-bootstrap-truncation treats it as a termination (G stops there).
            terminations.append(terminated if args.bootstrap_truncation else ended)

            # Episode accounting: the autoreset step is not part of any episode.
            episode_return += reward
            episode_length += ~next_autoreset
            for i in np.flatnonzero(ended):
                finished_returns.append(float(episode_return[i]))
                finished_lengths.append(int(episode_length[i]))
                complete_steps += int(episode_length[i])
            episode_return[ended] = 0.0
            episode_length[ended] = 0
            next_autoreset = ended

        episodes += len(finished_returns)
        episode_returns.extend(finished_returns)
        writer.add_scalar("charts/episodic_return", np.mean(finished_returns), global_step)
        writer.add_scalar("charts/episodic_length", np.mean(finished_lengths), global_step)

        # ---- returns ----
        b_obs = torch.stack(obs)  # (T, N, obs_dim)
        b_actions = torch.stack(actions)  # (T, N) or (T, N, act_dim)
        b_rewards, b_terminations, b_dones, b_valid = (
            torch.as_tensor(np.stack(x), dtype=torch.float32, device=device)
            for x in (rewards, terminations, dones, valid)
        )  # (T, N) each
        with torch.no_grad():
            values = agent.get_value(b_obs)  # (T, N), the baseline, before the update
            # obs[t + 1] is the observation returned by step t: the final observation when step t ended an
            # episode. A truncation adds gamma * V(final observation) to its reward, so G continues there.
            next_values = torch.cat([values[1:], agent.get_value(next_obs)[None]])
            truncations = b_dones - b_terminations
            returns = discounted_returns(
                b_rewards + args.gamma * truncations * next_values, b_dones, args.gamma
            )
        mask = complete_episode_mask(b_dones, b_valid)
        returns_mean, returns_std = masked_mean_std(returns, mask)
        advantages = returns - values
        b_mask = mask.bool()
        valid_adv = advantages[b_mask]
        if args.norm_adv:
            advantages = normalize(advantages, mask)

        # ---- update: one gradient step on the whole batch ----
        _, logprob, entropy = agent.get_action_and_logprob(b_obs, b_actions)
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
            v_loss = value_loss(agent.get_value(b_obs), returns, mask)
            optimizer.zero_grad()
            v_loss.backward()
            nn.utils.clip_grad_norm_(agent.critic.parameters(), max_norm)
            optimizer.step()
            v_loss_sum += v_loss.detach()
        stats["value_loss"] = v_loss_sum / args.value_epochs

        # ---- logging ----
        means = {k: v.item() for k, v in stats.items()}
        if not all(np.isfinite(v) for v in means.values()):
            status = "non-finite loss"
            break
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/policy_loss", means["policy_loss"], global_step)
        writer.add_scalar("losses/value_loss", means["value_loss"], global_step)
        writer.add_scalar("losses/entropy", means["entropy"], global_step)
        ev = explained_variance(values[b_mask], returns[b_mask]).item()
        writer.add_scalar("losses/explained_variance", ev, global_step)
        writer.add_scalar("debug/residual_variance", 1.0 - ev, global_step)
        writer.add_scalar("debug/advantage_mean", valid_adv.mean().item(), global_step)
        writer.add_scalar("debug/advantage_std", valid_adv.std(correction=0).item(), global_step)
        if not agent.continuous and action_space.n > 1:  # undefined with a single action (probes 1-3)
            writer.add_scalar(
                "debug/relative_entropy", means["entropy"] / np.log(action_space.n), global_step
            )
        writer.add_scalar("debug/return_mean", returns_mean.item(), global_step)
        writer.add_scalar("debug/return_std", returns_std.item(), global_step)
        writer.add_scalar("debug/grad_norm", means["grad_norm"], global_step)
        writer.add_scalar("debug/discarded_fraction", 1.0 - mask.sum().item() / mask.numel(), global_step)
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/SPS", sps, global_step)

        recent = float(np.mean(episode_returns)) if episode_returns else float("nan")
        bar.update(global_step - bar.n)
        bar.set_postfix(sps=sps, ret=f"{recent:.1f}", refresh=False)
        if not show_bar and args.progress and iteration % 25 == 0:
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
