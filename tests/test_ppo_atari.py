"""ppo_atari.py: the network, the Atari ids and protocols, whole-game accounting on real envpool games, the
autoreset step after a lost life, a smoke run on Breakout, and the Atari-shaped probes."""

import inspect
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo
import ppo_atari
from tests import conftest
from tests.conftest import PPO_METRICS, check_run_outputs, named_args, read_scalars

FRAMES = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)


def small_args(run_dir, **overrides):
    """Two iterations of 2 envs x 64 steps on Breakout."""
    return conftest.small_args("ppo_atari.py", run_dir, **overrides)


def record_envpool_steps(monkeypatch, **make_overrides):
    """Make every envpool env that the script builds record what each step returned (and, optionally, build
    it with other options, such as a short time limit). Returns the list the steps are appended to."""
    import envpool

    steps, real_make = [], envpool.make

    def make(*args, **kwargs):
        envs = real_make(*args, **{**kwargs, **make_overrides})
        real_step = envs.step

        def step(action):
            out = real_step(action)
            obs, reward, terminated, truncated, info = out
            steps.append(
                dict(
                    reward=reward.copy(),
                    terminated=terminated.copy(),
                    truncated=truncated.copy(),
                    raw_reward=info["reward"].copy(),
                    lives=info["lives"].copy(),
                    game_over=info["terminated"].astype(bool),
                    elapsed=info["elapsed_step"].copy(),
                )
            )
            return out

        envs.step = step
        return envs

    monkeypatch.setattr(envpool, "make", make)
    return steps


# ------------------------------------------------------------------------------------------------ unit
def test_nature_cnn_shapes_and_parameter_count():
    agent = ppo_atari.Agent(FRAMES, gym.spaces.Discrete(4))
    x = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    action, logprob, entropy, value = agent.get_action_and_value(x)
    assert action.shape == logprob.shape == entropy.shape == value.shape == (5,)
    assert agent.hidden(x).shape == (5, 512) and agent.greedy_action(x).shape == (5,)
    # conv 4->32 8x8: 8,224; 32->64 4x4: 32,832; 64->64 3x3: 36,928; 3136->512: 1,606,144; heads 2,052 + 513
    assert sum(p.numel() for p in agent.parameters()) == 1_686_693


def test_flat_parameters_keep_the_channels_last_layout():
    """flatten_parameters keeps each weight in its memory layout: the convolutions stay channels-last (what
    oneDNN is fast in), every weight keeps its values, and the network computes what it did before."""
    torch.manual_seed(0)
    agent = ppo_atari.Agent(FRAMES, gym.spaces.Discrete(4))
    before = {name: p.detach().clone() for name, p in agent.named_parameters()}
    x = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        expected = agent.get_action_and_value(x, torch.zeros(3, dtype=torch.long))
    flat = ppo_atari.flatten_parameters(agent)
    convs = [p for p in agent.parameters() if p.dim() == 4]
    assert len(convs) == 4 and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.grad.stride() == p.stride() for p in agent.parameters())
    for name, p in agent.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    with torch.no_grad():
        got = agent.get_action_and_value(x, torch.zeros(3, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_the_3136_to_512_layer_is_the_convolution_it_equals():
    """The Nature CNN's fully connected layer, written as a 7x7 convolution over the 7x7 map: it computes
    nn.Linear's function with the weight flattened in (channel, row, column) order, nn.Flatten's, and starts
    orthogonal over its 3136 inputs with gain sqrt(2), as layer_init makes a Linear."""
    torch.manual_seed(0)
    conv = ppo_atari.Agent(FRAMES, gym.spaces.Discrete(4)).network[6]
    weight = conv.weight.reshape(512, 64 * 7 * 7)
    assert torch.allclose(weight @ weight.T, 2 * torch.eye(512), atol=1e-4)
    x = torch.randn(5, 64, 7, 7).contiguous(memory_format=torch.channels_last)
    linear = torch.nn.functional.linear(x.flatten(1), weight, conv.bias)
    assert torch.allclose(conv(x).flatten(1), linear, atol=1e-5)


def test_shared_trunk_acting_agrees_with_the_update():
    """get_action (the rollout) and get_action_and_value (the update) are one network: same log-prob, same
    value; and frames are scaled to [0, 1] inside it, so uint8 and the float frames / 255 give the same."""
    torch.manual_seed(0)
    agent = ppo_atari.Agent(FRAMES, gym.spaces.Discrete(4))
    x = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        action, logprob, value = agent.get_action(x)
        _, logprob2, _, value2 = agent.get_action_and_value(x, action)
        assert torch.allclose(logprob, logprob2) and torch.allclose(value, value2)
        assert torch.allclose(agent.get_value(x), value)
        manual = agent.critic(agent.network(x.float() / 255.0)).squeeze(-1)
        assert torch.allclose(manual, value, atol=1e-6)


def test_compute_gae_is_ppos():
    assert inspect.getsource(ppo_atari.compute_gae) == inspect.getsource(ppo.compute_gae)
    g = torch.Generator().manual_seed(0)
    r, v, nv = (torch.randn(16, 3, generator=g) for _ in range(3))
    dones = (torch.rand(16, 3, generator=g) < 0.2).float()
    terms = dones * (torch.rand(16, 3, generator=g) < 0.5).float()
    for a, b in zip(
        ppo_atari.compute_gae(r, v, nv, terms, dones, 0.99, 0.95),
        ppo.compute_gae(r, v, nv, terms, dones, 0.99, 0.95),
        strict=True,
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "env_id, task, sticky",
    [
        ("BreakoutNoFrameskip-v4", "Breakout-v5", False),
        ("Breakout-v5", "Breakout-v5", False),
        ("ALE/Breakout-v5", "Breakout-v5", True),
        ("ALE/SpaceInvaders-v5", "SpaceInvaders-v5", True),
    ],
)
def test_atari_ids_and_protocols(env_id, task, sticky):
    envs = ppo_atari.make_env(env_id, 2, seed=0)
    c = envs.config
    assert envs.protocol == f"{task}, {'sticky actions' if sticky else 'NoFrameskip-v4'}"
    assert c["repeat_action_probability"] == (0.25 if sticky else 0.0)
    # the Atari details of the 37: every one of them is set, whatever envpool's defaults are
    assert (c["noop_max"], c["frame_skip"], c["stack_num"], c["img_height"], c["img_width"]) == (
        30,
        4,
        4,
        84,
        84,
    )
    assert c["episodic_life"] and c["reward_clip"] and c["use_fire_reset"] and c["gray_scale"]
    assert not c["full_action_space"] and c["max_episode_steps"] == 27_000  # 108k frames
    assert envs.single_observation_space.shape == (4, 84, 84) and envs.whole_games
    envs.close()


def test_ids_that_are_not_atari_games():
    import envpool

    assert ppo_atari.atari_task("Ant-v5", envpool) is None  # envpool has it, but it is MuJoCo
    assert ppo_atari.atari_task("probe_envs:Probe1Atari-v0", envpool) is None
    with pytest.raises(
        ppo_atari.UsageError, match="unknown environment id 'PonggNoFrameskip-v4'.*PongNoFrameskip-v4"
    ):
        ppo_atari.atari_task("PonggNoFrameskip-v4", envpool)


# ------------------------------------------------------------------------------------------------ episodes
def test_logged_returns_are_whole_games_with_raw_scores(run_dir, monkeypatch):
    """Space Invaders on envpool, driven by the training loop with the time limit lowered to 300 steps: games
    of several lives, games cut by the limit, rewards of 5 to 30 points. The truth comes from envpool's own
    step counter, which restarts at 0 only when a whole game restarts: a game ends at step t exactly when the
    counter reads 0 at step t + 1. Every logged return must be the sum of the unclipped rewards of one such
    game, none merged with the next (CleanRL's envpool wrapper merges a time-limited game with the next)."""
    steps = record_envpool_steps(monkeypatch, max_episode_steps=300)
    args = small_args(run_dir, env_id="SpaceInvaders-v5", num_envs=2, num_steps=128, total_timesteps=2048)
    summary = ppo_atari.main(args)

    elapsed = np.stack([s["elapsed"] for s in steps])  # (T, N)
    raw, clipped = np.stack([s["raw_reward"] for s in steps]), np.stack([s["reward"] for s in steps])
    games, lives_lost, truncated_games, clipped_differs = [], 0, 0, 0
    for i in range(args.num_envs):
        start = 0
        for t in range(len(steps) - 1):
            if elapsed[t + 1, i] == 0:  # step t ended a game
                games.append((t, raw[start : t + 1, i].sum()))
                lives = [s["lives"][i] for s in steps[start : t + 1]]
                lives_lost = max(lives_lost, lives[0] - min(lives))
                truncated_games += bool(steps[t]["truncated"][i] and steps[t]["lives"][i] > 0)
                clipped_differs += raw[start : t + 1, i].sum() != clipped[start : t + 1, i].sum()
                start = t + 1
    # the situations the test is about all happened
    assert lives_lost >= 2 and truncated_games >= 1 and clipped_differs >= 1
    assert summary["episodes"] == len(games) <= 100
    assert summary["episodic_return_mean_last100"] == pytest.approx(np.mean([r for _, r in games]))
    # each iteration logs the mean of the games that ended in it
    per_iteration = {}
    for t, r in games:
        per_iteration.setdefault((t // args.num_steps + 1) * args.batch_size, []).append(r)
    logged = dict(read_scalars(summary["run_dir"])["charts/episodic_return"])
    assert logged == pytest.approx({step: np.mean(rs) for step, rs in per_iteration.items()})


def test_the_step_after_a_lost_life_never_enters_the_loss(run_dir, monkeypatch):
    """With episodic life, envpool ends the episode at a lost life and ignores the next step's action (it plays
    no-ops and FIRE instead). The loss must get mask 0 for exactly the steps after an episode end."""
    steps = record_envpool_steps(monkeypatch)
    masks = []
    real_loss = ppo_atari.ppo_loss

    def spy_loss(*args, **kwargs):
        masks.append(named_args(real_loss, args, kwargs)["mask"].clone())
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(ppo_atari, "ppo_loss", spy_loss)
    # one minibatch in storage order, so that the masks line up with the steps
    monkeypatch.setattr(ppo_atari.torch, "randperm", lambda n, device=None: torch.arange(n, device=device))
    args = small_args(run_dir, num_minibatches=1, update_epochs=1, total_timesteps=512, num_steps=128)
    ppo_atari.main(args)
    mask = torch.cat(masks).reshape(-1, args.num_envs).numpy()  # (T, N) over both iterations
    ended = np.stack([s["terminated"] | s["truncated"] for s in steps])
    expected = np.concatenate([np.ones((1, args.num_envs)), 1.0 - ended[:-1]])
    assert np.array_equal(mask, expected)
    life_losses = np.stack([s["terminated"] & ~s["game_over"] for s in steps])
    assert life_losses[:-1].sum() >= 2  # lost lives (not game overs) were among the masked steps


# ------------------------------------------------------------------------------------------------ smoke
def test_smoke_breakout_outputs_and_metrics(run_dir):
    # 2 envs x 128 steps: long enough for untrained play to finish a game of Breakout (5 lives)
    args = small_args(run_dir, num_steps=128, total_timesteps=512, save_model=True, eval_episodes=1)
    summary = ppo_atari.main(args)
    check_run_outputs(summary, checkpoint=True)
    assert summary["global_step"] == 512 and summary["protocol"] == "Breakout-v5, NoFrameskip-v4"
    scalars = read_scalars(summary["run_dir"])
    missing = [m for m in PPO_METRICS if m not in scalars]
    assert not missing, missing
    assert len(scalars["losses/policy_loss"]) == 2
    assert summary["eval_return_mean"] >= 0 and len(scalars["eval/episodic_return"]) == 1
    ckpt = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=True)
    assert ckpt["agent"]["network.0.weight"].shape == (32, 4, 8, 8)


def test_smoke_on_the_atari_shaped_probes(run_dir):
    for k in (2, 5):
        summary = ppo_atari.main(small_args(run_dir, env_id=f"probe_envs:Probe{k}Atari-v0"))
        # one-step episodes, each followed by its autoreset step: 2 envs x 128 steps hold 128 episodes
        assert summary["backend"] == "gymnasium" and summary["episodes"] == 128
        assert summary["protocol"] == "as registered"


# ------------------------------------------------------------------------------------------------ learning
def test_probes_pass():
    """Probe 5: values and a policy that both depend on the frames. Probes 1 to 4 add little here: GAE
    and the loss are word-for-word copies of ppo.py's (test_conventions.py), which passes all five, and the
    episode ends of this script's rollout are tested above. `python probe_envs.py --scripts ppo_atari.py`
    runs all five, five runs where this test makes one (measured 2026-11-23: 11 checks, all pass)."""
    import probe_envs

    assert probe_envs.main(["--scripts", "ppo_atari.py", "--probes", "5"]) == 0
