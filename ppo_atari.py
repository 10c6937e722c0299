"""PPO for Atari from pixels: ppo.py plus the Atari environment protocol and a convolutional network.

Adds over ppo.py: the Atari details of the 37, done by envpool in C++ (make_env lists them; an id picks
the protocol, atari_task), the Nature CNN as one trunk for policy and value with frames stored as uint8,
and logged returns that are the raw scores of whole games (game_score), as researchers compare them.

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
Details: Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization"
(https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/); defaults are CleanRL's
`ppo_atari_envpool.py`, which follow the PPO paper's Atari settings.

Run:    python ppo_atari.py --env-id BreakoutNoFrameskip-v4 --seed 1
Expect: about 400 on Breakout after the default 10M steps (CleanRL: 415 +- 28; random play: 1.1); what a
        CPU run reaches in a smaller budget is in the README's results table (measured, with the command).

Read top to bottom: Args, ENVIRONMENT, NETWORK, ALGORITHM, then train(): the whole algorithm. Below the
RUN HARNESS fence: checkpoints, signals, logging set-up and the command line, the same in every script.
"""

import contextlib
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn


# ----------------------------------------------- ARGUMENTS -----------------------------------------------
@dataclass
class Args:
    env_id: str = "BreakoutNoFrameskip-v4"  # an Atari id, or a gymnasium id with (4, 84, 84) uint8 frames
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"  # auto = envpool if it has the id
    total_timesteps: int = 10_000_000  # total environment steps, summed over environments
    learning_rate: float = 2.5e-4  # the learning rate of the Adam optimizer (typical 1e-4 to 1e-3)
    num_envs: int = 8  # the number of parallel environments
    num_steps: int = 128  # the number of steps per environment in each rollout
    anneal_lr: bool = True  # linearly anneal the learning rate to 0 over the run
    gamma: float = 0.99  # the discount factor (0.9 to 0.999)
    gae_lambda: float = 0.95  # the GAE lambda (0.9 to 1; 1 gives Monte Carlo advantages)
    num_minibatches: int = 4  # the number of minibatches each batch is split into
    update_epochs: int = 4  # the number of passes over each batch
    norm_adv: bool = True  # normalise advantages within each minibatch to mean 0, std 1
    clip_coef: float = 0.1  # the surrogate clipping coefficient epsilon (0.1 to 0.3)
    clip_vloss: bool = True  # clip the value loss around the old values, as in the PPO paper's code
    ent_coef: float = 0.01  # the coefficient of the entropy bonus (0 to 0.01)
    vf_coef: float = 0.5  # the coefficient of the value loss
    max_grad_norm: float = 0.5  # the maximum norm of the gradient; larger gradients are scaled down to it
    target_kl: Optional[float] = None  # stop an update's epochs above this mean approx KL (0.01 to 0.05)
    bootstrap_truncation: bool = True  # bootstrap time-limit ends from V(final obs); off: as terminations

    # Running, saving and logging
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the experiment's name, part of the run name
    seed: int = 1  # seed of the experiment (torch, numpy, python and the environments)
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, use CUDA when it is available
    torch_threads: int = 2  # CPU threads for torch; the CNN's convolutions use more than one (README, Speed)
    pin_cpu: bool = False  # on CPU, keep the process on one core; off: the CNN uses all cores (README, Speed)
    compile: bool = False  # torch.compile acting and the loss (README, Speed; the first iteration compiles)
    cudagraphs: bool = False  # CUDA only: also record them as CUDA graphs (torch.compile's reduce-overhead)
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

    # to be filled in __post_init__
    batch_size: int = field(init=False)  # the batch size (num_envs * num_steps)
    minibatch_size: int = field(init=False)  # the minibatch size (batch_size // num_minibatches)
    num_iterations: int = field(init=False)  # the number of iterations (total_timesteps // batch_size)

    def __post_init__(self):
        check_args(self)  # the ranges of all flags (in the harness below)
        if self.cudagraphs and not (self.cuda and torch.cuda.is_available()):
            raise UsageError("--cudagraphs needs a CUDA device (CUDA graphs replay GPU kernels)")
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


# ---------------------------------------------- ENVIRONMENT ----------------------------------------------
# Atari ids: `<Game>NoFrameskip-v4`, `<Game>-v5` (NoFrameskip-v4 protocol), `ALE/<Game>-v5` (sticky actions)
ATARI_ID = re.compile(r"(?P<ale>ALE/)?(?P<game>[A-Za-z0-9]+?)(?P<version>NoFrameskip-v4|-v5)")


def atari_task(env_id: str, envpool):
    """(envpool task id, protocol) when env_id names an Atari game, None for any other id."""
    m = ATARI_ID.fullmatch(env_id)
    if m is None or (m["ale"] and m["version"] != "-v5"):
        return None
    task = f"{m['game']}-v5"
    if task in envpool.list_all_envs() and isinstance(envpool.make_spec(task), envpool.atari.AtariEnvSpec):
        return task, ("sticky actions" if m["ale"] else "NoFrameskip-v4")
    if m["ale"] or m["version"] == "NoFrameskip-v4":  # unmistakably meant as Atari: name the games
        games = [e.removesuffix("-v5") for e in envpool.list_all_envs() if e.endswith("-v5")]
        raise unknown_env_id(env_id, [f"{m['ale'] or ''}{game}{m['version']}" for game in games])
    return None  # e.g. Ant-v5: not a game; the generic path below handles it


def make_env(env_id: str, num_envs: int, seed: int, backend: str = "auto", render: bool = False):
    """Vectorised environments, seeded, with the next-step autoreset of envpool and gymnasium >= 1.0.

    When an episode ends at step t, the observation returned by step t is the FINAL observation of that
    episode; step t+1 ignores its action, resets, and returns reward 0 with the first observation of the
    next episode. The training loop relies on exactly this, on both backends. An Atari episode is one life:
    the step after a lost life is an autoreset step too (envpool plays no-ops and FIRE, the game goes on).
    """
    with contextlib.redirect_stderr(io.StringIO()):
        import envpool  # here, so that importing this script does no work; it prints old gym's notice
    # one envpool worker per core this process may use, at most one per env (its default counts the cores of
    # the machine, not those of a pinned process, whose threads on one core only take turns)
    cores = min(num_envs, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else 0

    atari = atari_task(env_id, envpool)
    if atari is not None:
        if backend == "gymnasium":  # (that backend is for gymnasium ids whose frames are preprocessed)
            raise UsageError(f"'{env_id}' is an Atari id: it runs on envpool, which does the preprocessing")
        task, protocol = atari
        envs = envpool.make(
            task,
            env_type="gymnasium",
            num_envs=num_envs,
            seed=seed,
            num_threads=cores,
            noop_max=30,  # up to 30 no-ops after each reset: varied starts
            frame_skip=4,  # each action repeated for 4 frames; the max over the last two is kept (flicker)
            episodic_life=True,  # a lost life ends the training episode (the game goes on)
            use_fire_reset=True,  # press FIRE after a reset, in the games that have it
            img_height=84,
            img_width=84,
            gray_scale=True,
            reward_clip=True,  # training rewards are sign(r); game_score gives the raw ones
            stack_num=4,  # the observation is the last 4 frames: (4, 84, 84) uint8
            repeat_action_probability=0.25 if protocol == "sticky actions" else 0.0,
            full_action_space=False,  # the game's minimal action set
            max_episode_steps=27_000,  # 108k frames
            **({"render_mode": "rgb_array"} if render else {}),
        )
        envs.single_observation_space = envs.observation_space
        envs.single_action_space = envs.action_space
        envs.num_envs = num_envs
        envs.backend = "envpool"
        envs.protocol = f"{task}, {protocol}"
        envs.whole_games = True
        envs.render_fps = 15  # 60 Hz Atari, one frame kept out of every 4
        return envs

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
        envs.protocol, envs.whole_games = "as registered", False
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
        raise unknown_env_id(env_id, list(gym.registry) + list(envpool.list_all_envs())) from e
    except ImportError as e:
        raise UsageError(f"environment id '{env_id}': cannot import its module ({e})") from e
    envs.reset(seed=seed)  # seeds every sub-environment; later resets continue from these seeds
    envs.backend = "gymnasium"
    envs.protocol, envs.whole_games = "as registered", False
    envs.render_fps = envs.metadata.get("render_fps") or 30
    return envs


def game_score(envs, reward, terminated, truncated, info):
    """(raw reward, game over) of a step: training episodes are lives with clipped rewards, but a score is a
    whole game's unclipped rewards (envpool's info); a time-limit cut ends the game too, so that the next
    game's score is never added to it (CleanRL's envpool statistics wrapper adds it)."""
    if envs.whole_games:
        return info["reward"], info["terminated"].astype(bool) | truncated
    return reward, terminated | truncated


def check_spaces(envs):
    """ppo_atari.py handles stacks of 84x84 uint8 frames and discrete actions; say which fits otherwise."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    frames = isinstance(obs_space, gym.spaces.Box) and obs_space.shape[1:] == (84, 84)  # (stack, 84, 84)
    if not frames or obs_space.dtype != np.uint8:
        raise UsageError(
            f"ppo_atari.py needs (4, 84, 84) uint8 frames, this env has {obs_space}; use ppo.py for vector "
            "observations or ppo_procgen_impala.py for (64, 64, 3) images"
        )
    if not isinstance(act_space, gym.spaces.Discrete):
        raise UsageError(f"ppo_atari.py needs discrete actions, this env has {act_space}")


def check_render(args):
    """--capture-video: render one frame now, so that a missing renderer is reported before training."""
    try:
        env = make_env(args.env_id, 1, args.seed, args.env_backend, render=True)
        env.reset()
        if env.render() is None:
            raise ValueError("render() returned no frame")
        env.close()
    except Exception as e:
        raise UsageError(f"--capture-video: cannot render '{args.env_id}' as rgb_array ({e})") from e


def evaluate(agent, env_id, episodes, seed, device, backend, video_folder=None):
    """Play `episodes` whole games greedily with the training protocol (FIRE after each lost life, as in
    training); their raw scores. With `video_folder`, each game is written there as an mp4."""
    envs = make_env(env_id, 1, seed, backend, render=video_folder is not None)
    obs, _ = envs.reset()
    frames = [np.asarray(envs.render()[0])] if video_folder else []
    returns = []
    for episode in range(episodes):
        done, total = False, 0.0
        while not done:
            with torch.inference_mode():
                action = agent.greedy_action(torch.as_tensor(obs, device=device))
            obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            if video_folder:
                frames.append(np.asarray(envs.render()[0]))
            raw_reward, game_over = game_score(envs, reward, terminated, truncated, info)
            total += float(raw_reward[0])
            done = game_over[0]
        returns.append(total)
        if video_folder:
            from moviepy import ImageSequenceClip

            os.makedirs(video_folder, exist_ok=True)
            path = os.path.join(video_folder, f"eval-game-{episode}.mp4")
            ImageSequenceClip(frames, fps=envs.render_fps).write_videofile(path, logger=None)
            frames = []
    envs.close()
    return returns


# ------------------------------------------------ NETWORK ------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    """Orthogonal weights with gain `std` and constant bias, as in baselines' PPO (detail 2 of the 37)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The Nature CNN (Mnih et al. 2015): one trunk for a policy head (gain 0.01: a near-uniform start) and a
    value head (gain 1). Its 3136 -> 512 layer is the 7x7 convolution it equals (the same weights and init),
    which some CPUs run 2x faster (README, Speed). uint8 frames become [0, 1] floats here."""

    def __init__(self, observation_space, action_space):
        super().__init__()
        channels = observation_space.shape[0]
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(channels, 32, 8, stride=4)),  # (4, 84, 84) -> (32, 20, 20)
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),  # -> (64, 9, 9)
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),  # -> (64, 7, 7)
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 512, 7)),  # -> (512, 1, 1): the 3136 -> 512 linear layer (docstring)
            nn.Flatten(),
            nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(512, action_space.n), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        # channels-last (NHWC) memory: much faster CPU convolutions (README, Speed), neutral or better on GPUs
        self.to(memory_format=torch.channels_last)

    def hidden(self, x):
        # uint8 -> [0, 1]; the layout changes before the conversion, on 4x fewer bytes
        x = x.contiguous(memory_format=torch.channels_last).float() / 255.0
        return self.network(x)

    def get_value(self, x):
        return self.critic(self.hidden(x)).squeeze(-1)

    # The categorical distribution is written out (log-softmax, Gumbel-max sampling, log-prob, entropy)
    # rather than a torch.distributions.Categorical: the formulas are worth seeing, and ppo.py does the same.
    def get_action(self, x):
        """Acting: (action, log-prob, value), all three from one pass through the trunk."""
        hidden = self.hidden(x)
        logits = self.actor(hidden)
        action = (logits.softmax(-1) / torch.empty_like(logits).exponential_()).argmax(-1)  # Gumbel-max
        logprob = logits.log_softmax(-1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
        return action, logprob, self.critic(hidden).squeeze(-1)

    def get_action_and_value(self, x, action=None):
        hidden = self.hidden(x)
        log_probs = self.actor(hidden).log_softmax(-1)  # log pi(a|s) for every action a
        if action is None:
            action = (log_probs.exp() / torch.empty_like(log_probs).exponential_()).argmax(-1)  # Gumbel-max
        logprob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, logprob, entropy, self.critic(hidden).squeeze(-1)

    def greedy_action(self, x):
        return self.actor(self.hidden(x)).argmax(-1)


def flatten_parameters(module):
    """Make every parameter of `module`, and its gradient, a view of one flat tensor (returned) and of its
    gradient: Adam and the clip then run once, not per tensor (README, Speed); zero it, never set it None."""
    params = list(module.parameters())  # each kept in its memory layout (channels-last convolutions too)
    flat = nn.Parameter(torch.cat([p.detach().as_strided((p.numel(),), (1,)) for p in params]))
    flat.grad, sizes = torch.zeros_like(flat), [p.numel() for p in params]
    for p, data, grad in zip(params, flat.data.split(sizes), flat.grad.split(sizes), strict=True):
        p.data, p.grad = data.as_strided(p.shape, p.stride()), grad.as_strided(p.shape, p.stride())
    return flat


# -------------- ALGORITHM (pure functions: tensors in, tensors out; the tests import them) ---------------
def compute_gae(rewards, values, next_values, terminations, dones, gamma, gae_lambda):
    """Generalised advantage estimation (Schulman et al. 2016), all arguments (num_steps, num_envs).
    next_values[t] is V of the true next state of step t (the final observation when the episode ended);
    terminations[t] stops bootstrapping (a true end: the next state has value 0);
    dones[t] (termination or truncation) stops the advantage chain: step t+1 belongs to another episode."""
    # TD errors of every step at once; only the backward recursion needs a loop over time
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values
    chain = gamma * gae_lambda * (1.0 - dones)
    advantages, lastgaelam = [], torch.zeros_like(rewards[0])
    for delta, c in zip(deltas.unbind(0)[::-1], chain.unbind(0)[::-1], strict=True):  # t = T-1, ..., 0
        lastgaelam = delta + c * lastgaelam
        advantages.append(lastgaelam)
    advantages = torch.stack(advantages[::-1])
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
    """The clipped PPO objective on one minibatch, averaged over its valid steps (mask == 1): the loss to
    minimise and a dict of 0-dim tensors for logging."""
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
    # (with ent_coef 0, MuJoCo's default, the loss has no entropy term: backward skips the entropy's graph)
    entropy_bonus = args.ent_coef * entropy_loss if args.ent_coef else 0.0
    loss = pg_loss - entropy_bonus + v_loss * args.vf_coef
    stats = dict(policy_loss=pg_loss.detach(), value_loss=v_loss.detach(), entropy=entropy_loss.detach())
    stats.update(old_approx_kl=old_approx_kl, approx_kl=approx_kl, clipfrac=clipfrac)
    return loss, stats


# ----------------------------------------------- TRAINING ------------------------------------------------
def train(args: Args, run):
    """PPO: collect a rollout with the current policy, compute advantages, update for a few epochs; repeat."""
    device = run.device
    # a resumed run seeds its environments afresh, so that it does not replay the episodes it started with
    envs = make_env(args.env_id, args.num_envs, args.seed + run.global_step, args.env_backend)
    check_spaces(envs)
    if args.capture_video:
        check_render(args)
    agent = Agent(envs.single_observation_space, envs.single_action_space).to(device)
    flat_params = flatten_parameters(agent)
    optimizer = torch.optim.Adam([flat_params], lr=args.learning_rate, eps=1e-5, fused=True)  # eps: ppo2's
    # what a checkpoint holds: --resume and --eval-checkpoint restore it, --save-model writes it
    state = {"agent": agent, "optimizer": optimizer}
    info = {"backend": envs.backend, "protocol": envs.protocol}
    run.start(args.num_iterations * args.batch_size, info, **state)

    # --compile: torch.compile fuses acting's and the loss's many small operations (--cudagraphs: into CUDA
    # graphs too). GAE stays eager: its loop over time, unrolled, compiles for minutes, for little (README).
    loss_fn = ppo_loss
    if args.compile or args.cudagraphs:
        mode = "reduce-overhead" if args.cudagraphs else "default"
        torch._inductor.config.fallback_random = True  # eager's random draws: the same actions as without
        agent.get_action = torch.compile(agent.get_action, mode=mode)
        agent.get_action_and_value = torch.compile(agent.get_action_and_value, mode=mode)
        loss_fn = torch.compile(ppo_loss, mode=mode)

    # Storage, allocated once on the device.
    obs_shape = (args.num_steps, args.num_envs) + envs.single_observation_space.shape  # (T, N, *obs shape)
    obs = torch.zeros(obs_shape, dtype=torch.uint8, device=device)  # (T, N, 4, 84, 84) frames as given
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)  # (T, N)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)  # (T, N) log pi_old(a|s)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)  # (T, N) V_old(s)
    # (T, N) each: rewards and episode ends arrive on the host, are kept there and move to the device once
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminations = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)  # true ends: no bootstrap
    dones = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)  # terminated or truncated
    # valid[t] = 0: step t is an autoreset step, whose action the env ignored; it must not enter the loss
    valid = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)

    global_step = run.global_step
    next_obs_np, _ = envs.reset()
    next_obs = torch.as_tensor(next_obs_np, device=device)
    next_autoreset = np.zeros(args.num_envs, dtype=bool)
    episode_return = np.zeros(args.num_envs, dtype=np.float64)
    episode_length = np.zeros(args.num_envs, dtype=np.int64)

    for iteration in run.iterations():
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = run.annealed(args.learning_rate)

        # ---- rollout ----
        finished_returns, finished_lengths = [], []
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

            # Episode accounting by whole games with raw scores; an autoreset step adds no length, reward 0.
            raw_reward, game_over = game_score(envs, reward, terminated, truncated, info)
            episode_return += raw_reward
            episode_length += ~next_autoreset
            finished_returns += episode_return[game_over].tolist()
            finished_lengths += episode_length[game_over].tolist()
            episode_return[game_over] = 0.0
            episode_length[game_over] = 0
            next_autoreset = ended
        run.log_episodes(global_step, finished_returns, finished_lengths)

        # ---- advantages ----
        with torch.no_grad():
            # values[] came with the actions (shared trunk); only the observation after the rollout is new
            next_value = agent.get_value(next_obs)
            # obs[t + 1] is the observation returned by step t: with next-step autoreset it is the true
            # next state, the final observation when step t ended an episode.
            next_values = torch.cat([values[1:], next_value[None]])
            # the rollout's host buffers, moved to the device once
            r, term, done = (torch.as_tensor(x, device=device) for x in (rewards, terminations, dones))
            advantages, returns = compute_gae(r, values, next_values, term, done, args.gamma, args.gae_lambda)

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
                    newlogprob, b_logprobs[mb_inds], b_advantages[mb_inds], newvalue, b_values[mb_inds],
                    b_returns[mb_inds], entropy, b_valid[mb_inds], args,
                )  # fmt: skip
                flat_params.grad.zero_()  # in place: every parameter's gradient is a view of it
                loss.backward()
                stats["grad_norm"] = nn.utils.clip_grad_norm_(flat_params, args.max_grad_norm)
                optimizer.step()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                epoch_kl += stats["approx_kl"]
                num_updates += 1
            if args.target_kl is not None and (epoch_kl / args.num_minibatches) > args.target_kl:
                break

        # ---- logging ----
        means = {k: (v / num_updates).item() for k, v in sums.items()}
        if not all(np.isfinite(v) for v in means.values()):  # one NaN or inf in any minibatch
            raise RunFailed("non-finite loss", f"non-finite loss at iteration {iteration}")
        b_valid_bool = b_valid.bool()
        ev = explained_variance(b_values[b_valid_bool], b_returns[b_valid_bool]).item()
        valid_adv = b_advantages[b_valid_bool]
        metrics = {"charts/learning_rate": optimizer.param_groups[0]["lr"]}
        for k in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
            metrics[f"losses/{k}"] = means[k]
        metrics["losses/explained_variance"] = ev
        if envs.single_action_space.n > 1:  # entropy / log|A| is undefined with a single action (probes 1-3)
            metrics["debug/relative_entropy"] = means["entropy"] / np.log(envs.single_action_space.n)
        metrics["debug/residual_variance"] = 1.0 - ev
        metrics["debug/advantage_mean"] = valid_adv.mean().item()
        metrics["debug/advantage_std"] = valid_adv.std(correction=0).item()
        metrics["debug/grad_norm"] = means["grad_norm"]
        run.log(global_step, metrics)

    envs.close()
    run.evaluate(
        lambda episodes, video_folder: evaluate(
            agent, args.env_id, episodes, args.seed, device, args.env_backend, video_folder
        )
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
