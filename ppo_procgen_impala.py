"""PPO on Procgen with the IMPALA CNN: ppo_atari.py plus Procgen's games, a deeper network, and a test
of generalisation on the full level distribution.

Adds over ppo_atari.py: the 16 Procgen games (procedurally generated levels, 64x64 RGB frames) adapted in
ENVIRONMENT only; the IMPALA CNN (`--network nature`: ppo_atari.py's CNN, for comparison); the Procgen
paper's PPO settings with reward scaling (ppo_continuous.py's RewardScaler); and a test of generalisation:
`--num-test-envs` environments on the paper's test levels, logged as charts/test_episodic_return.

Paper: Cobbe et al. 2020, "Leveraging Procedural Generation to Benchmark Reinforcement Learning",
https://arxiv.org/abs/1912.01588; IMPALA CNN: Espeholt et al. 2018, https://arxiv.org/abs/1802.01561.

Run:    python ppo_procgen_impala.py --env-id bigfish --seed 1
Expect: about 16-20 on bigfish after the default 25M steps (CleanRL: 16.5; baselines: 20.1); what a
        CPU run reaches in a smaller budget is in the README's results table (measured, with the command).

Read top to bottom: Args, ENVIRONMENT, NETWORK, ALGORITHM, then train(): the whole algorithm. Below the
RUN HARNESS fence: checkpoints, signals, logging set-up and the command line, the same in every script.
"""

import contextlib
import io
import os
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
    env_id: str = "bigfish"  # a Procgen game (`bigfish`, `procgen-bigfish-v0`) or an id with 64x64 RGB frames
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"  # other ids: auto = envpool if it has it
    distribution_mode: Literal["easy", "hard"] = "easy"  # difficulty (the paper: easy 25M steps, hard 200M)
    num_levels: int = 0  # training levels from --start-level; 0: all levels (200: the paper's generalisation)
    start_level: int = 0  # the first training level (with --num-levels 0, ignored: every level plays)
    num_test_envs: int = 16
    """environments on the test levels (the full level distribution), played alongside training; 0: none"""
    network: Literal["impala", "nature"] = "impala"  # the CNN: IMPALA's, or the Nature CNN for comparison
    total_timesteps: int = 25_000_000  # total environment steps, summed over environments
    learning_rate: float = 5e-4  # the learning rate of the Adam optimizer (typical 1e-4 to 1e-3)
    num_envs: int = 64  # the number of parallel environments
    num_steps: int = 256  # the number of steps per environment in each rollout
    anneal_lr: bool = False  # linearly anneal the learning rate to 0 (the Procgen paper keeps it constant)
    gamma: float = 0.999  # the discount factor (0.9 to 0.999)
    gae_lambda: float = 0.95  # the GAE lambda (0.9 to 1; 1 gives Monte Carlo advantages)
    num_minibatches: int = 8  # the number of minibatches each batch is split into
    update_epochs: int = 3  # the number of passes over each batch
    norm_adv: bool = True  # normalise advantages within each minibatch to mean 0, std 1
    clip_coef: float = 0.2  # the surrogate clipping coefficient epsilon (0.1 to 0.3)
    clip_vloss: bool = True  # clip the value loss around the old values, as in the PPO paper's code
    ent_coef: float = 0.01  # the coefficient of the entropy bonus (0 to 0.01)
    vf_coef: float = 0.5  # the coefficient of the value loss
    max_grad_norm: float = 0.5  # the maximum norm of the gradient; larger gradients are scaled down to it
    target_kl: Optional[float] = None  # stop an update's epochs above this mean approx KL (0.01 to 0.05)
    bootstrap_truncation: bool = True
    """bootstrap a time-limit end from V(final obs); other envs only: Procgen games never truncate (their
    time-outs are terminations, as in the paper)"""
    norm_reward: bool = True
    """divide rewards by the running std of the return discounted with --gamma (0.999), clipped to [-10, 10],
    as CleanRL's ppo_procgen.py; the paper's code scales with baselines' VecNormalize default, 0.99"""

    # Running, saving and logging
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the experiment's name, part of the run name
    seed: int = 1  # seed of the experiment (torch, numpy, python and the environments)
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, use CUDA when it is available
    torch_threads: int = 2  # CPU threads for torch; the CNN's convolutions use more than one (README, Speed)
    pin_cpu: bool = False  # on CPU, keep the process on one core; off: the CNN uses all cores (README, Speed)
    compile: bool = False  # torch.compile acting and the loss (README, Speed; the first iteration compiles)
    cudagraphs: bool = False  # CUDA only: also record them as CUDA graphs (torch.compile's reduce-overhead)
    eval_episodes: int = 0  # test-level episodes after training (sampled actions), as eval/episodic_return
    capture_video: bool = False  # record the evaluation episodes (at least one) to <run>/videos
    save_model: bool = False  # write <run>/checkpoint.pt every --save-interval iterations and at the end
    save_interval: int = 25  # iterations between checkpoints with `--save-model`
    resume: Optional[str] = None  # a checkpoint to continue from; its args are the defaults, flags override
    eval_checkpoint: Optional[str] = None  # evaluate this checkpoint and exit (--eval-episodes, 0 means 10)
    run_dir: str = "runs"  # directory that holds one sub-directory per run
    progress: bool = True  # show a progress bar when stdout is a terminal
    track: bool = False  # if toggled, also log to Weights & Biases (imported only then)
    wandb_project_name: str = "rl-scripts"  # the W&B project name
    wandb_entity: Optional[str] = None  # the W&B entity (team or user); None uses your default

    # to be filled in __post_init__
    batch_size: int = field(init=False)  # the batch size (num_envs * num_steps)
    minibatch_size: int = field(init=False)  # the minibatch size (batch_size // num_minibatches)
    num_iterations: int = field(init=False)  # the number of iterations (total_timesteps // batch_size)

    def __post_init__(self):
        check_args(self)  # the ranges of all flags and the checkpoint files (in the harness below)
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
PROCGEN_GAMES = (
    "bigfish bossfight caveflyer chaser climber coinrun dodgeball fruitbot heist jumper leaper maze miner "
    "ninja plunder starpilot"
).split()


def procgen_game(env_id: str):
    """The game's name when env_id names a Procgen game (`bigfish` or `procgen-bigfish-v0`), else None."""
    name = env_id.removeprefix("procgen:").removeprefix("procgen-").removesuffix("-v0")
    if name in PROCGEN_GAMES:
        return name
    if env_id.startswith(("procgen-", "procgen:")):  # unmistakably meant as Procgen: name the games
        raise unknown_env_id(env_id, [f"procgen-{game}-v0" for game in PROCGEN_GAMES])
    return None


def levels(args, test=False):
    """make_env's Procgen arguments: the training levels, or (test) the full level distribution, the
    Procgen paper's test set: with num_levels 0 procgen draws from 2^31 levels (and ignores start_level), so
    N training levels come up there with probability N / 2^31. With --num-levels 0 both are the same."""
    num_levels, start_level = (0, 0) if test else (args.num_levels, args.start_level)
    return dict(num_levels=num_levels, start_level=start_level, distribution_mode=args.distribution_mode)


class ProcgenVectorEnv:
    """procgen's ProcgenEnv (old gym VecEnv API, dict observations) in the training loop's vector API. It
    resets a finished episode INSIDE the step that ends it (the final frame is never shown), so no step is
    an autoreset step, and every `done` is a termination: its time-outs are part of the game (the paper)."""

    autoreset_next_step = False

    def __init__(
        self, game, num_envs, seed, num_levels=0, start_level=0, distribution_mode="easy", render=False
    ):
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
        level_range = f"levels {start_level}-{start_level + num_levels - 1}" if num_levels else "every level"
        self.protocol = f"{game}, {distribution_mode}, {level_range}"
        self.render_fps = 15

    def reset(self):
        return self.env.reset()["rgb"], {}

    def step(self, actions):
        obs, reward, done, infos = self.env.step(actions)
        info = {"level_seed": np.array([i["level_seed"] for i in infos])}  # the level each env now plays
        return obs["rgb"], reward.astype(np.float32), done.astype(bool), np.zeros(self.num_envs, bool), info

    def render(self):
        return self.env.render(mode="rgb_array")[None]  # env 0's 512x512 view

    def close(self):
        self.env.close()


def make_env(env_id: str, num_envs: int, seed: int, backend: str = "auto", render: bool = False, **levels):
    """Vectorised environments, seeded, with the next-step autoreset of envpool and gymnasium >= 1.0.

    When an episode ends at step t, the observation returned by step t is the FINAL observation of that
    episode; step t+1 ignores its action, resets, and returns reward 0 with the first observation of the
    next episode. The training loop relies on exactly this, on both backends. Procgen games reset within
    step t (`envs.autoreset_next_step` is False), on their `levels` (other envs ignore them).
    """
    game = procgen_game(env_id)
    if game is not None:
        return ProcgenVectorEnv(game, num_envs, seed, render=render, **levels)

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
        raise unknown_env_id(
            env_id, list(gym.registry) + list(envpool.list_all_envs()) + PROCGEN_GAMES
        ) from e
    except ImportError as e:
        raise UsageError(f"environment id '{env_id}': cannot import its module ({e})") from e
    envs.reset(seed=seed)  # seeds every sub-environment; later resets continue from these seeds
    envs.backend = "gymnasium"
    envs.protocol, envs.autoreset_next_step = "as registered", True
    envs.render_fps = envs.metadata.get("render_fps") or 30
    return envs


def check_spaces(envs):
    """ppo_procgen_impala.py handles 64x64 RGB uint8 images and discrete actions; say which fits otherwise."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    frames = isinstance(obs_space, gym.spaces.Box) and obs_space.shape == (64, 64, 3)  # (height, width, RGB)
    if not frames or obs_space.dtype != np.uint8:
        raise UsageError(
            f"ppo_procgen_impala.py needs (64, 64, 3) uint8 images, this env has {obs_space}; use ppo.py for "
            "vector observations or ppo_atari.py for (4, 84, 84) frames"
        )
    if not isinstance(act_space, gym.spaces.Discrete):
        raise UsageError(f"ppo_procgen_impala.py needs discrete actions, this env has {act_space}")


def check_render(args, **levels):
    """--capture-video: render one frame now, so that a missing renderer is reported before training."""
    try:
        env = make_env(args.env_id, 1, args.seed, args.env_backend, render=True, **levels)
        env.reset()
        if env.render() is None:
            raise ValueError("render() returned no frame")
        env.close()
    except Exception as e:
        raise UsageError(f"--capture-video: cannot render '{args.env_id}' as rgb_array ({e})") from e


def evaluate(agent, env_id, episodes, seed, device, backend, video_folder=None, **levels):
    """Play `episodes` whole episodes on a fresh environment (on `levels`) with actions sampled from the
    policy, as the Procgen paper measures (a greedy policy can stall in a game forever); their returns. With
    `video_folder`, each episode is written there as an mp4."""
    envs = make_env(env_id, 1, seed, backend, render=video_folder is not None, **levels)
    obs, _ = envs.reset()
    frames = [np.asarray(envs.render()[0])] if video_folder else []
    returns = []
    for episode in range(episodes):
        done, total = False, 0.0
        while not done:
            with torch.inference_mode():
                action, _, _ = agent.get_action(torch.as_tensor(obs, device=device))
            obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
            if video_folder:
                frames.append(np.asarray(envs.render()[0]))
            total += float(reward[0])
            done = terminated[0] or truncated[0]
        returns.append(total)
        if video_folder:
            from moviepy import ImageSequenceClip

            os.makedirs(video_folder, exist_ok=True)
            path = os.path.join(video_folder, f"eval-episode-{episode}.mp4")
            ImageSequenceClip(frames, fps=envs.render_fps).write_videofile(path, logger=None)
            frames = []
    envs.close()
    return returns


class TestEnvs:
    """The test of generalisation: --num-test-envs environments on the test levels (`levels`), played
    alongside training by the same policy, sampling as in training; nothing of it is stored or learned from.
    With --num-test-envs 0 there are none, and step() finishes no episodes."""

    def __init__(self, args, global_step, device):
        self.levels, self.device, self.envs = levels(args, test=True), device, None
        if args.num_test_envs > 0:
            seed = args.seed + 1_000_000 + global_step  # apart from the training envs' seeds
            self.envs = make_env(args.env_id, args.num_test_envs, seed, args.env_backend, **self.levels)
            self.obs = torch.as_tensor(self.envs.reset()[0], device=device)
            self.episode_return = np.zeros(args.num_test_envs, dtype=np.float64)

    def step(self, agent):
        """One step of every test env; the returns of the episodes that ended."""
        if self.envs is None:
            return []
        with torch.inference_mode():
            action, _, _ = agent.get_action(self.obs)
        obs, reward, terminated, truncated, _ = self.envs.step(action.cpu().numpy())
        self.obs = torch.as_tensor(obs, device=self.device)
        self.episode_return += reward
        ended = terminated | truncated
        finished = self.episode_return[ended].tolist()
        self.episode_return[ended] = 0.0
        return finished

    def close(self):
        if self.envs is not None:
            self.envs.close()


class RunningMeanStd(nn.Module):
    """Running mean and population variance of a stream of batches (Chan et al. 1979), in buffers."""

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x):
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0, correction=0), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + batch_count
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean.add_(delta * batch_count / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)


class RewardScaler:
    """Rewards divided by the running std of the discounted return, clipped to [-clip, clip] (gymnasium's
    NormalizeReward), not shifted (that would change the task); updated once per rollout, returns carry over."""

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
        scaled = rewards / np.sqrt(self.rms.var.item() + 1e-8)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def state_dict(self):
        return {"rms": self.rms.state_dict(), "discounted": torch.from_numpy(self.discounted.copy())}

    def load_state_dict(self, state):
        self.rms.load_state_dict(state["rms"])
        self.discounted = state["discounted"].numpy().astype(np.float64)  # a copy, as the scaler keeps it


# ------------------------------------------------ NETWORK ------------------------------------------------
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
        # Channels-last (NHWC) memory: the CPU convolution kernels are much faster with it (README, Speed);
        # on a GPU it is neutral or better.
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
        """Acting: (action, log-prob, value), all three from one pass through the trunk."""
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


# -------------- ALGORITHM (pure functions: tensors in, tensors out; the tests import them) ---------------
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


# ----------------------------------------------- TRAINING ------------------------------------------------
def train(args: Args, run):
    """PPO: collect a rollout with the current policy, compute advantages, update for a few epochs; repeat."""
    device = run.device
    # a resumed run seeds its environments afresh, so that it does not replay the episodes it started with
    envs = make_env(args.env_id, args.num_envs, args.seed + run.global_step, args.env_backend, **levels(args))
    check_spaces(envs)
    test_envs = TestEnvs(args, run.global_step, device)  # on the test levels, never trained on
    if args.capture_video:
        check_render(args, **test_envs.levels)
    agent = Agent(envs.single_observation_space, envs.single_action_space, args.network).to(device)
    reward_scaler = RewardScaler(args.num_envs, args.gamma)
    # eps=1e-5 as in baselines ppo2; fused=True: one kernel updates every parameter
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    # what a checkpoint holds: --resume and --eval-checkpoint restore it, --save-model writes it
    state = {"agent": agent, "optimizer": optimizer, "reward_scaler": reward_scaler}
    info = {"backend": envs.backend, "protocol": envs.protocol}
    run.start(args.num_iterations * args.batch_size, info, **state)

    # --compile: torch.compile fuses acting's and the loss's many small operations (--cudagraphs: into CUDA
    # graphs too). GAE stays eager: its loop over time, unrolled, compiles for minutes, for little (README).
    loss_fn = ppo_loss
    if args.compile or args.cudagraphs:
        mode = "reduce-overhead" if args.cudagraphs else "default"
        agent.get_action = torch.compile(agent.get_action, mode=mode)
        agent.get_action_and_value = torch.compile(agent.get_action_and_value, mode=mode)
        loss_fn = torch.compile(ppo_loss, mode=mode)

    # Storage, allocated once on the device.
    obs_shape = (args.num_steps, args.num_envs) + envs.single_observation_space.shape  # (T, N, 64, 64, 3)
    obs = torch.zeros(obs_shape, dtype=torch.uint8, device=device)  # images as the env gives them: uint8
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

            next_obs_np, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
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
            next_autoreset = ended & envs.autoreset_next_step  # never for Procgen: it resets within a step
            finished_test_returns += test_envs.step(agent)
        run.log_episodes(global_step, finished_returns, finished_lengths)
        run.log_episodes(global_step, finished_test_returns, prefix="test_")

        # ---- advantages ----
        scaled_rewards = reward_scaler(rewards, dones, valid) if args.norm_reward else rewards
        with torch.no_grad():
            # values[] came with the actions (shared trunk); only the observation after the rollout is new
            next_value = agent.get_value(next_obs)
            # obs[t + 1] is the observation returned by step t: with next-step autoreset it is the true
            # next state, the final observation when step t ended an episode.
            next_values = torch.cat([values[1:], next_value[None]])
            # the rollout's host buffers, moved to the device once
            r, term, done = (torch.as_tensor(x, device=device) for x in (scaled_rewards, terminations, dones))
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
                optimizer.zero_grad()
                loss.backward()
                stats["grad_norm"] = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
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
            run.fail("non-finite loss")
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
    test_envs.close()
    run.evaluate(
        lambda episodes, folder: evaluate(
            agent, args.env_id, episodes, args.seed, device, args.env_backend, folder, **test_envs.levels
        )
    )


# ============================================ RUN HARNESS ============================================
# No reinforcement learning below this line, and the same bytes in every script (a test compares them).
# train() above talks to it through `run`: start, iterations, annealed, log_episodes, log, fail, evaluate.
# Here: argument checks, device, seeding and CPU pinning, checkpoints (plain data, loaded once), the run
# directory, TensorBoard and W&B, SIGINT/SIGTERM, the progress line, summary.json and the JSON last line;
# and, for a script that sets DATA_PARALLEL (run by torchrun), the ranks: rank 0 alone writes anything.
import difflib
import json
import math
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import fields

import torch.distributed as dist
import tyro

SCRIPT = os.path.basename(__file__)
CHECKPOINT_FORMAT = "rl-scripts checkpoint v2"
CHECKPOINT_KEYS = ("script", "args", "global_step", "iteration", "episodes", "returns", "schedule", "rng")
# Argument ranges, by field name (each script has some of these fields): (test, what the value must be).
RULES = {
    **dict.fromkeys(
        ("num_envs", "num_steps", "num_minibatches", "update_epochs", "batch_size", "value_epochs")
        + ("torch_threads", "save_interval", "total_timesteps"),
        (lambda v: v >= 1, ">= 1"),
    ),
    **dict.fromkeys(
        ("eval_episodes", "num_test_envs", "num_levels", "start_level"), (lambda v: v >= 0, ">= 0")
    ),
    **dict.fromkeys(("gamma", "gae_lambda"), (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")),
    **dict.fromkeys(("learning_rate", "value_learning_rate", "clip_coef"), (lambda v: v > 0, "> 0")),
    "max_grad_norm": (lambda v: v is None or v > 0, "> 0"),
    "target_kl": (lambda v: v is None or v > 0, "> 0 (or None: off)"),
    **dict.fromkeys(("ent_coef", "vf_coef"), (lambda v: v >= 0, ">= 0")),
}
# The Procgen games, so that another script can say that ppo_procgen_impala.py runs them
PROCGEN_NAMES = (
    "bigfish bossfight caveflyer chaser climber coinrun dodgeball fruitbot heist jumper leaper maze miner "
    "ninja plunder starpilot"
).split()


class UsageError(Exception):
    """Bad input (a flag, an environment id, a checkpoint): one line on stderr, exit 1, nothing written."""


class RunFailed(Exception):
    """A run that cannot go on; `status` names what happened and becomes the summary's status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class Interrupted(BaseException):
    """Raised by a stop signal where nothing can wait for the end of an iteration (a second signal, or the
    first during evaluation). A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_args(args):
    """The ranges in RULES, finite numbers, existing checkpoint files; called by Args.__post_init__."""
    for f in fields(args):
        value, flag = getattr(args, f.name, None), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        if f.name in RULES and f.init and not RULES[f.name][0](value):
            raise UsageError(f"{flag} must be {RULES[f.name][1]}, got {value}")
    if args.resume is not None and args.eval_checkpoint is not None:
        raise UsageError("--resume and --eval-checkpoint exclude each other (continue training, or evaluate)")
    for flag, path in (("--resume", args.resume), ("--eval-checkpoint", args.eval_checkpoint)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag}: no checkpoint file at '{path}'")


def runs_elsewhere(env_id: str):
    """(what the id is, the script of this repository that runs it) for an Atari or Procgen id, else None."""
    m = re.fullmatch(r"(ALE/)?([A-Za-z0-9]+?)(NoFrameskip-v4|-v5)", env_id)
    if m and (m[1] or m[3] == "NoFrameskip-v4"):  # unmistakably Atari, and a game envpool has
        with contextlib.redirect_stderr(io.StringIO()):
            import envpool
        if f"{m[2]}-v5" in envpool.list_all_envs():
            return "an Atari id", "ppo_atari.py"
    if re.sub(r"^(procgen:)?(procgen-)?|-v0$", "", env_id) in PROCGEN_NAMES:
        return "a Procgen game", "ppo_procgen_impala.py"
    return None


def unknown_env_id(env_id: str, known) -> UsageError:
    """The error for an id that no backend has: the script that runs it, or the closest known ids."""
    elsewhere = runs_elsewhere(env_id)
    if elsewhere is not None and elsewhere[1] != SCRIPT:
        return UsageError(f"'{env_id}' is {elsewhere[0]}: {elsewhere[1]} runs it, not {SCRIPT}")
    close = list(dict.fromkeys(difflib.get_close_matches(env_id.split(":")[-1], known, n=3)))
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UsageError(f"unknown environment id '{env_id}'{hint}")


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


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NoWriter:
    """The TensorBoard writer of the ranks other than 0, which log nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def collective_failed(e: BaseException) -> bool:
    """Whether `e` came out of a torch.distributed call (gloo raises a plain RuntimeError when a peer is gone)."""
    frames = traceback.extract_tb(e.__traceback__)
    return isinstance(e, dist.DistError) or bool(frames) and "torch/distributed/" in frames[-1].filename


def one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


_loaded = {}  # the last checkpoint read, by (path, modification time): parse_args and Run read it once


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this script, as plain data on the CPU. `weights_only=True` unpickles tensors and
    plain containers only, so a file holding anything else is refused instead of run."""
    key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
    if key not in _loaded:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UsageError(
                f"refused checkpoint '{path}': it holds objects other than tensors and plain data, "
                "and loading those could run code"
            ) from e
        except Exception as e:
            raise UsageError(f"cannot read checkpoint '{path}': {one_line(e)}") from e
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"'{path}' is not a checkpoint of these scripts (or of an older version)")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] + [
            k for k in ("args",) if not isinstance(ckpt.get(k), dict)
        ]
        if missing:
            raise UsageError(f"checkpoint '{path}' is incomplete: no {', '.join(dict.fromkeys(missing))}")
        if ckpt["script"] != SCRIPT:
            raise UsageError(f"'{path}' was not written by this script ({SCRIPT}) but by {ckpt['script']}")
        _loaded.clear()
        _loaded[key] = ckpt
    return _loaded[key]


def write_atomically(path: str, data: bytes):
    """Write to `path.tmp`, then rename: a crash, a signal or a full disk never leaves a truncated file,
    and the previous file stays intact until the new one is complete."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        status = (e.strerror or "write error").lower()  # e.g. "no space left on device"
        raise RunFailed(status, f"{status}: cannot write {path}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, obj: dict):
    write_atomically(path, (json.dumps(obj, indent=2) + "\n").encode())


def rng_state(device) -> dict:
    """Every random generator's state, in types that `weights_only` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])  # a CPU ByteTensor, as loaded
    if torch.cuda.is_available():  # the GPUs that exist here (a checkpoint may come from a larger machine)
        for i, cuda_state in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


class Run:
    """One run: what train() needs besides the algorithm. See the fence comment for the calls."""

    def __init__(self, args):
        self.args = args
        # torchrun starts one process per rank and says which in the environment; plain python is rank 0 of 1
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0)) if self.world_size > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if self.world_size > 1 else 0
        if self.world_size > 1 and not globals().get("DATA_PARALLEL"):
            raise UsageError(f"{SCRIPT} runs in one process; ppo_atari_multigpu.py is the one for torchrun")
        cuda = torch.cuda.is_available() and args.cuda
        if cuda and self.local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"local rank {self.local_rank} but {torch.cuda.device_count()} CUDA device(s) here: start at most "
                "one process per GPU (torchrun --nproc_per_node), or add --no-cuda"
            )
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if self.world_size > 1:
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo")
        # --pin-cpu first, so that every thread started later inherits the core: envpool steps the
        # environments in worker threads, and a hand-off to another core costs more than a small env step.
        # (Not with several ranks: they could land on one core.)
        pin = args.pin_cpu and not cuda and hasattr(os, "sched_setaffinity") and self.world_size == 1
        if pin and args.torch_threads > 1:
            raise UsageError(
                f"--pin-cpu holds the run to one core, where {args.torch_threads} torch threads would spin "
                "against each other: add --no-pin-cpu, or use --torch-threads 1"
            )
        self.cpu_core = pin_to_current_core() if pin else None
        torch.set_num_threads(args.torch_threads)
        seed_everything(args.seed + self.rank)  # rank 0's weights are broadcast in start()
        torch.backends.cudnn.deterministic = args.torch_deterministic

        if getattr(args, "cudagraphs", False) and self.device.type != "cuda":
            raise UsageError("--cudagraphs needs a CUDA device (CUDA graphs replay GPU kernels)")
        if args.capture_video:
            # moviepy's ffmpeg helper warns on import about its own use of setuptools' pkg_resources
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            try:
                import moviepy  # noqa: F401  (the videos are written with it)
            except ImportError as e:
                raise UsageError("--capture-video needs moviepy: pip install -e '.[video]'") from e
            # frames are rendered off-screen (rgb_array): SDL (pygame) needs no window, and without this it
            # prints an error line about a missing XDG_RUNTIME_DIR on a machine without a desktop
            os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        if args.track and self.rank == 0:
            self._check_wandb_login()
        self.checkpoint = (
            load_checkpoint(args.resume or args.eval_checkpoint)
            if args.resume or args.eval_checkpoint
            else None
        )
        progress = self.checkpoint or {}
        self.global_step = progress.get("global_step", 0)
        self.iteration = progress.get("iteration", 0)
        self.episodes = dict(progress.get("episodes", {}))  # {prefix: count}; "" is training, "test_" ...
        self.returns = {k: deque(v, maxlen=100) for k, v in progress.get("returns", {}).items()}
        self.schedule = progress.get("schedule")  # [step, fraction, steps]: see annealed()
        self.last_fraction = progress.get("last_fraction")
        self.path = self.writer = self.bar = None
        self.status, self.error, self.stop_signal, self.signal_time = "finished", None, None, 0.0
        self.next_print = 0
        self.info, self.summary, self.closed = {}, None, False
        self.start_time, self.start_step = time.time(), self.global_step  # (again when training starts)

    @staticmethod
    def _check_wandb_login():
        try:
            import wandb
        except ImportError as e:
            raise UsageError("--track needs wandb: pip install wandb") from e
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
        if not offline and not wandb.login(prompt=False, verify=False):
            raise UsageError(
                "--track: not logged in to Weights & Biases (`wandb login`, or WANDB_MODE=offline)"
            )

    # ---- the calls from train() ----
    def start(self, steps: int, info: dict, **state):
        """Register what a checkpoint holds (objects with state_dict/load_state_dict: the agent, the
        optimizer, normalisers), restore it from --resume or --eval-checkpoint, and open the run directory.
        `steps` is the budget of environment steps; `info` ({"backend": ...}) goes into the summary."""
        self.steps, self.info, self.state = steps, dict(info), state
        ckpt, args = self.checkpoint, self.args
        if ckpt is not None:
            for name, obj in state.items():
                # an optimizer keeps the rate it was built with: the flags', which override the checkpoint's
                rates = [g["lr"] for g in obj.param_groups] if isinstance(obj, torch.optim.Optimizer) else []
                try:
                    obj.load_state_dict(ckpt[name])
                    for group, rate in zip(getattr(obj, "param_groups", []), rates, strict=False):
                        group["lr"] = rate
                except (KeyError, ValueError, RuntimeError) as e:
                    path = args.resume or args.eval_checkpoint
                    raise UsageError(
                        f"checkpoint '{path}' does not fit this run's {name}: {one_line(e)}"
                    ) from e
        for obj in state.values():  # every rank starts from rank 0's weights
            if self.world_size > 1 and isinstance(obj, torch.nn.Module):
                for tensor in obj.state_dict().values():
                    dist.broadcast(tensor, 0)
        if args.eval_checkpoint:
            return
        if ckpt is not None:
            set_rng_state(ckpt["rng"])  # rank 0's; the other ranks draw streams of their own
            if self.rank > 0:
                seed_everything(args.seed + self.rank + self.world_size * self.global_step)
            if self.global_step >= steps:
                self.status = "already finished"
                return
            stored = ckpt["args"]
            new_rate = args.learning_rate != stored["learning_rate"]
            if new_rate or steps != self.schedule[2]:
                # a new budget or a new rate: from the rate reached (or the new one) to 0 over what remains
                self.schedule = [self.global_step, 1.0 if new_rate else self.last_fraction or 1.0, steps]
            self.path = os.path.dirname(os.path.abspath(args.resume))
        else:
            self.schedule = [0, 1.0, steps]
            self.path = self._make_run_dir() if self.rank == 0 else None
            if self.world_size > 1:  # rank 0's, so that every rank names the same run in its messages
                paths = [self.path]
                dist.broadcast_object_list(paths, 0)
                self.path = paths[0]
        self._open_logs()
        if ckpt is not None and self.rank == 0:  # the resume and what it changed go on record (args.json
            # keeps the first start)
            given = {k: v for k, v in self.args_dict().items() if k not in ("resume", "eval_checkpoint")}
            changed = {k: [ckpt["args"].get(k), v] for k, v in given.items() if ckpt["args"].get(k) != v}
            record = {"global_step": self.global_step, "iteration": self.iteration, "changed": changed}
            try:
                with open(os.path.join(self.path, "resumes.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise RunFailed((e.strerror or "write error").lower(), f"cannot write in {self.path}") from e
        self.writer.add_text("environment", f"{args.env_id}: " + ", ".join(map(str, self.info.values())))
        where = ", ".join(map(str, self.info.values()))
        print(f"run: {self.path}  env: {args.env_id} ({where})  device: {self.device}", flush=True)
        if steps < args.total_timesteps:  # whole iterations only: say so rather than stop short in silence
            size = f" of {args.batch_size} steps" if hasattr(args, "batch_size") else ""
            total = args.total_timesteps
            print(f"budget: --total-timesteps {total} rounded down to {steps} (whole iterations{size})")
        self.start_time, self.start_step = time.time(), self.global_step

    def iterations(self):
        """Iteration numbers, 1, 2, ... (continuing after a resume), until the budget of steps is spent or
        a stop signal arrived. Each iteration ends with run.log(); with --save-model, a checkpoint follows
        every --save-interval iterations."""
        while self.path is not None and self.global_step < self.steps and not self._stopping():
            self.iteration += 1
            step_before = self.global_step
            yield self.iteration
            if self.global_step == step_before:
                raise RuntimeError("train() must call run.log(global_step, ...) once in every iteration")
            if self.args.save_model and self.iteration % self.args.save_interval == 0 and self.rank == 0:
                self.save_checkpoint()
        if self.stop_signal is not None and self.path is not None and self.global_step < self.steps:
            self.status = "interrupted"

    def annealed(self, rate: float) -> float:
        """`rate` annealed linearly to 0 at the end of the budget. A resumed run continues the schedule; with
        a new budget (or a new --learning-rate) it goes from the rate reached (or the new one) to 0 over the
        steps that remain, never jumping."""
        start_step, fraction, steps = self.schedule
        self.last_fraction = fraction * (1.0 - (self.global_step - start_step) / (steps - start_step))
        return self.last_fraction * rate

    def log_episodes(self, global_step: int, returns: list, lengths: list = None, prefix: str = ""):
        """Episodes that ended in this iteration: their mean return (and length) at global_step; the summary
        keeps the last 100 returns and the count. `prefix` keeps a second kind apart (e.g. "test_"). With
        several ranks, every rank's episodes, gathered."""
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, (list(returns), list(lengths or [])))
            returns = [r for rank_returns, _ in gathered for r in rank_returns]
            lengths = (
                [n for _, rank_lengths in gathered for n in rank_lengths] if lengths is not None else None
            )
        self.episodes[prefix] = self.episodes.get(prefix, 0) + len(returns)
        self.returns.setdefault(prefix, deque(maxlen=100)).extend(float(r) for r in returns)
        if len(returns):
            self.writer.add_scalar(f"charts/{prefix}episodic_return", np.mean(returns), global_step)
        if lengths is not None and len(lengths):
            self.writer.add_scalar(f"charts/{prefix}episodic_length", np.mean(lengths), global_step)

    def log(self, global_step: int, scalars: dict):
        """The end of an iteration: its metrics (and the SPS) to TensorBoard at global_step, the progress."""
        self.global_step = global_step
        sps = int((global_step - self.start_step) / max(time.time() - self.start_time, 1e-9))
        for tag, value in {**scalars, "charts/SPS": sps}.items():
            self.writer.add_scalar(tag, value, global_step)
        recent = float(np.mean(self.returns[""])) if self.returns.get("") else float("nan")
        if self.bar is not None:
            self.bar.update(global_step - self.bar.n)
            self.bar.set_postfix(sps=sps, ret=f"{recent:.1f}", refresh=False)
        elif self.args.progress and global_step >= self.next_print:  # about every tenth of the budget
            self.next_print = global_step + self.steps / 10
            print(f"step {global_step:>10}  return(last100) {recent:8.2f}  SPS {sps}", flush=True)

    def mean_over_ranks(self, values: dict) -> dict:
        """{name: number or 0-d tensor} -> {name: float}, each averaged over the ranks (one all-reduce). In
        one process, the values as floats."""
        stacked = torch.stack([torch.as_tensor(v).to(self.device, torch.float64) for v in values.values()])
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return dict(zip(values, stacked.tolist(), strict=True))

    def fail(self, status: str):
        """Stop the run: `status` (e.g. "non-finite loss") names why. The last checkpoint is kept as it is."""
        kept = self.checkpoint_path if os.path.exists(self.checkpoint_path or "") else None
        where = f" at iteration {self.iteration}" + (f"; the last good checkpoint is {kept}" if kept else "")
        raise RunFailed(status, f"{status}{where}: stopped")

    def evaluate(self, play):
        """After training: the checkpoint and summary.json are written first, so that nothing can lose the
        finished run; then `play(episodes, video_folder)` returns the returns of that many evaluation
        episodes (--eval-episodes; one with --capture-video). A stop signal ends the evaluation at once."""
        args = self.args
        self._close_training()
        if self.world_size > 1 and self.status in ("finished", "interrupted"):
            # no rank exits before rank 0 has written: torchrun stops the others when one exits with an error
            dist.all_reduce(torch.zeros((), device=self.device))
        episodes = args.eval_episodes or (10 if args.eval_checkpoint else int(args.capture_video))
        if self.status != "finished" or episodes == 0:
            return
        if self.stop_signal is not None:  # arrived after the last iteration
            self.status = "evaluation interrupted"
            return
        if self.rank > 0:  # rank 0 evaluates; the others have nothing left to do
            return
        folder = os.path.dirname(os.path.abspath(args.eval_checkpoint)) if args.eval_checkpoint else self.path
        self.status = "evaluation interrupted"  # until play() returns; a signal now stops it at once
        returns = play(episodes, os.path.join(folder, "videos") if args.capture_video else None)
        self.status = "finished"
        self.summary.update(eval_episodes=len(returns), eval_return_mean=float(np.mean(returns)))
        self.summary["eval_return_std"] = float(np.std(returns))
        if self.writer is not None:
            for i, r in enumerate(returns):
                self.writer.add_scalar("eval/episodic_return", r, i)

    # ---- internals ----
    def args_dict(self) -> dict:
        return {f.name: getattr(self.args, f.name) for f in fields(self.args) if f.init}

    @property
    def checkpoint_path(self):
        return os.path.join(self.path, "checkpoint.pt") if self.path else None

    def save_checkpoint(self):
        progress = {"global_step": self.global_step, "iteration": self.iteration, "episodes": self.episodes}
        progress.update(returns={k: list(v) for k, v in self.returns.items()}, schedule=self.schedule)
        state = {name: obj.state_dict() for name, obj in self.state.items()}
        meta = {"format": CHECKPOINT_FORMAT, "script": SCRIPT, "args": self.args_dict()}
        meta["rng"] = rng_state(self.device)
        buffer = io.BytesIO()
        torch.save({**meta, **progress, "last_fraction": self.last_fraction, **state}, buffer)
        write_atomically(self.checkpoint_path, buffer.getvalue())

    def _make_run_dir(self) -> str:
        args = self.args
        name = re.sub(
            r"[^A-Za-z0-9_.\-]", "-", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        )
        path, n = os.path.join(args.run_dir, name), 1
        while True:
            try:
                os.makedirs(path)
                break
            except FileExistsError:  # another run started in the same second
                path, n = os.path.join(args.run_dir, f"{name}-{n}"), n + 1
            except OSError as e:
                raise UsageError(f"--run-dir: cannot create '{path}': {e.strerror}") from e
        try:  # every argument, derived sizes included
            write_json(os.path.join(path, "args.json"), {f.name: getattr(args, f.name) for f in fields(args)})
        except RunFailed as e:
            shutil.rmtree(path, ignore_errors=True)
            raise UsageError(f"--run-dir: {e}") from e
        return path

    def _stopping(self) -> bool:
        """Whether a stop signal arrived; with several ranks, at any rank, so that all stop together."""
        if self.world_size > 1:
            signum = torch.tensor(self.stop_signal or 0, device=self.device)
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
            if self.stop_signal is None and signum.item():
                self.stop_signal, self.signal_time = int(signum.item()), time.time()
        return self.stop_signal is not None

    def _open_logs(self):
        args = self.args
        if self.rank > 0:
            self.writer = NoWriter()
            return
        if args.track:
            import wandb

            try:
                wandb.init(
                    project=args.wandb_project_name,
                    entity=args.wandb_entity,
                    sync_tensorboard=True,
                    config=self.args_dict(),
                    name=os.path.basename(self.path),
                    dir=self.path,
                    save_code=True,
                )
            except Exception as e:
                if not args.resume:
                    shutil.rmtree(self.path, ignore_errors=True)
                raise UsageError(f"--track: W&B did not start: {one_line(e)}") from e
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.path)
        table = "\n".join(f"|{k}|{v}|" for k, v in self.args_dict().items())
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        show_bar = args.progress and sys.stdout.isatty()
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, initial=self.global_step, unit="step")
        self.next_print = self.global_step + self.steps / 10

    def _close_training(self):
        """Once: the progress bar, the checkpoint (--save-model, a stop signal, or a resumed run, whose
        checkpoint must end where it ends) and summary.json."""
        if self.summary is not None:
            return
        if self.bar is not None:
            self.bar.close()
        args = self.args
        if args.eval_checkpoint:
            self.summary = {"env_id": args.env_id, "checkpoint": args.eval_checkpoint, "status": self.status}
            self.summary["global_step"] = self.global_step
            return
        self.summary = {
            "env_id": args.env_id,
            "seed": args.seed,
            "global_step": self.global_step,
            "episodes": self.episodes.get("", 0),
            "episodic_return_mean_last100": float(np.mean(self.returns[""]))
            if self.returns.get("")
            else None,
            "sps": int((self.global_step - self.start_step) / max(time.time() - self.start_time, 1e-9)),
            "wall_seconds": round(time.time() - self.start_time, 2),
            "status": self.status,
            **self.info,
            "cpu_core": self.cpu_core,
        }
        for prefix in sorted(k for k in self.returns if k):
            self.summary[f"{prefix}episodes"] = self.episodes[prefix]
            returns = self.returns[prefix]
            self.summary[f"{prefix}episodic_return_mean_last100"] = (
                float(np.mean(returns)) if returns else None
            )
        resumed_path = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None
        self.summary["run_dir"] = self.path or resumed_path
        if self.world_size > 1:
            self.summary["ranks"] = self.world_size
        if self.status == "already finished":  # the run's own record, untouched
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(self.summary["run_dir"], "summary.json")) as f:
                    old = {k: v for k, v in json.load(f).items() if k not in ("signal", "error")}
                    self.summary = {**old, "status": self.status}
        if self.path is None or self.status == "already finished" or self.rank > 0:
            return
        healthy = self.status in ("finished", "interrupted")
        if healthy and (args.save_model or args.resume or self.stop_signal is not None):
            self.save_checkpoint()
        write_json(os.path.join(self.path, "summary.json"), self.summary)

    def fail_at_close(self, e: RunFailed):
        """A failure while closing: it names the status, unless an earlier failure already did."""
        if self.error is None:
            self.status, self.error = e.status, str(e)
            print(f"error: {e}", file=sys.stderr, flush=True)

    def close(self):
        """The end, whatever happened: the checkpoint and summary.json (again, with the evaluation), the logs,
        and the JSON line, printed last and always."""
        if self.closed:
            return
        self.closed = True
        try:
            self._close_training()
        except RunFailed as e:
            self.fail_at_close(e)
        for finish in (self.writer.close if self.writer else None, self._finish_wandb):
            try:
                if finish is not None:
                    finish()
            except Exception as e:  # e.g. the disk filled up while TensorBoard flushed its events
                self.fail_at_close(RunFailed("logs not written", f"cannot write the logs: {one_line(e)}"))
        # strict JSON for every parser: a NaN or infinite number (e.g. the returns of NaN rewards) is null
        summary = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in self.summary.items()
        }
        summary["status"] = self.status
        if self.error:
            summary["error"] = self.error
        if self.stop_signal is not None:
            summary["signal"] = signal.Signals(self.stop_signal).name
        self.summary = summary
        if self.path is not None and self.status != "already finished" and self.rank == 0:
            try:
                write_json(os.path.join(self.path, "summary.json"), summary)
            except RunFailed as e:
                self.fail_at_close(e)
                summary.update(status=self.status, error=self.error)
        print(json.dumps(summary, allow_nan=False), flush=True)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def _finish_wandb(self):
        if self.args.track and self.path is not None and self.rank == 0:
            import wandb

            wandb.finish()


def main(args) -> dict:
    """train(args, run) inside the harness. Returns the summary, also printed as the last stdout line; its
    "status" says how the run ended (cli() maps it to the exit code). Bad input raises UsageError first.

    SIGINT and SIGTERM: the first asks the run to stop after the current iteration (during evaluation, it
    stops the evaluation at once); a second one quits at once. While the run closes (checkpoint, summary,
    JSON line), signals are only recorded: nothing can cut the last line off."""
    run = None

    def on_signal(signum, frame):
        if run is not None and run.closed:
            run.stop_signal = run.stop_signal or signum
            return
        if run is not None and run.world_size > 1 and signum == run.stop_signal:
            if (
                time.time() - run.signal_time < 10
            ):  # the same stop, delivered again (torchrun, Slurm, terminal)
                return
        if run is None or run.stop_signal is not None or run.status == "evaluation interrupted":
            raise Interrupted(signum)
        run.stop_signal, run.signal_time = signum, time.time()
        name = signal.Signals(signum).name
        # os.write, not print: a signal can arrive while the loop is inside a print of its own
        message = f"\n{name}: finishing this iteration, then saving a checkpoint ({name} again quits now)\n"
        os.write(2, message.encode())

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run = Run(args)
        try:
            train(args, run)
        except RunFailed as e:
            run.status, run.error = e.status, str(e)
            print(f"error: {e}", file=sys.stderr, flush=True)
        except Interrupted as e:  # a second signal, or one during evaluation
            run.stop_signal = run.stop_signal or e.signum
            if run.status != "evaluation interrupted":
                run.status = "aborted"  # no checkpoint: the user asked to quit now
            print(f"\n{e.args[0]}: stopped", file=sys.stderr, flush=True)
        except UsageError:
            if run.path is not None and not args.resume and run.rank == 0:
                shutil.rmtree(run.path, ignore_errors=True)  # a run that never started leaves nothing behind
            raise
        except Exception as e:
            if run.world_size > 1 and collective_failed(e):  # another rank stopped; its own error says why
                run.status, run.error = "rank failed", f"another rank stopped: {one_line(e)}"
                print(f"error: {run.error}", file=sys.stderr, flush=True)
            else:  # a bug: its traceback follows the summary of what the run had done
                run.status = "crashed"
                run.close()
                raise
        if run.status == "already finished" and run.rank == 0:
            where = os.path.dirname(os.path.abspath(args.resume))
            print(
                f"already finished: {where} is at step {run.global_step} of {run.steps}; nothing to do "
                "(a larger --total-timesteps continues it)",
                file=sys.stderr,
            )
        run.close()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return run.summary


def parse_args(argv=None) -> "Args":
    """tyro parsing; with --resume or --eval-checkpoint, the checkpoint's arguments are the defaults and the
    flags given override them. An evaluation does not inherit the run's logging, saving or video flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag in ("resume", "eval_checkpoint"):
        path = None
        for i, arg in enumerate(argv):  # --resume PATH, --resume=PATH, --eval_checkpoint PATH, ...
            name, equals, value = arg.partition("=")
            if name.lstrip("-").replace("-", "_") == flag and name.startswith("--"):
                path = value if equals else (argv[i + 1] if i + 1 < len(argv) else None)
        if path is not None and os.path.isfile(path):
            break
    else:
        return tyro.cli(Args, args=argv)
    stored = load_checkpoint(path)["args"]
    given = {"resume": None, "eval_checkpoint": None, flag: path}
    if flag == "eval_checkpoint":
        given.update(track=False, save_model=False, capture_video=False)
    try:
        default = Args(**{**stored, **given})
    except TypeError as e:
        raise UsageError(f"'{path}' holds arguments this script does not have ({e})") from e
    args = tyro.cli(Args, args=argv, default=default)
    return Args(**{f.name: getattr(args, f.name) for f in fields(Args) if f.init})  # recompute derived sizes


def cli() -> int:
    """The exit code: 0 for a finished run (also one already finished), 128 + the signal's number for a run
    stopped by a signal (130 for SIGINT, 143 for SIGTERM, as a shell reports them), 1 for any failure.
    Under torchrun, the ranks other than 0 print nothing on stdout (their errors still go to stderr)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and int(os.environ.get("RANK", 0)) > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    try:
        summary = main(parse_args())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        print(json.dumps({"status": "usage error", "error": str(e)}), flush=True)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:  # before the run started: nothing to save
        name = e.args[0] if isinstance(e, Interrupted) else "SIGINT"
        print(f"{name}: stopped before the run started", file=sys.stderr, flush=True)
        print(json.dumps({"status": "aborted", "signal": name}), flush=True)
        return 128 + signal.Signals[name].value
    if summary["status"] in ("finished", "already finished"):
        return 0
    if summary["status"] in ("interrupted", "evaluation interrupted", "aborted"):
        return 128 + signal.Signals[summary["signal"]].value
    return 1


if __name__ == "__main__":
    sys.exit(cli())
