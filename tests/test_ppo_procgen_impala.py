"""ppo_procgen_impala.py: the two networks, the Procgen adapter and ids, the reward scaling, the test-level
test, smoke runs on a real Procgen game with both networks, and the Procgen-shaped probes."""

import inspect

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo
import ppo_continuous
import ppo_procgen_impala as pp
from tests import conftest
from tests.conftest import PPO_METRICS, check_run_outputs, named_args, read_scalars

IMAGES = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)


def small_args(run_dir, **overrides):
    return conftest.small_args("ppo_procgen_impala.py", run_dir, **overrides)


# ------------------------------------------------------------------------------------------------ unit
@pytest.mark.parametrize(
    "network, hidden, params",
    [
        # stacks: 448 + 4 x 2,320; 4,640 + 4 x 9,248; 9,248 + 4 x 9,248; linear 2048 -> 256: 524,544;
        # heads 256 x 15 + 15 = 3,855 and 257
        ("impala", 256, 9_728 + 41_632 + 46_240 + 524_544 + 3_855 + 257),
        # convs 6,176 + 32,832 + 36,928; linear 1024 -> 512: 524,800; heads 7,695 and 513
        ("nature", 512, 6_176 + 32_832 + 36_928 + 524_800 + 7_695 + 513),
    ],
)
def test_network_shapes_and_parameter_counts(network, hidden, params):
    agent = pp.Agent(IMAGES, gym.spaces.Discrete(15), network)
    assert sum(p.numel() for p in agent.parameters()) == params
    x = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    assert agent.hidden(x).shape == (5, hidden)
    action, logprob, entropy, value = agent.get_action_and_value(x)
    assert action.shape == logprob.shape == entropy.shape == value.shape == (5,)
    with torch.no_grad():
        sampled, logprob2, value2 = agent.get_action(x)
        assert torch.allclose(agent.get_action_and_value(x, sampled)[1], logprob2)
        assert torch.allclose(agent.get_value(x), value2)


def test_impala_stacks_halve_the_image_and_blocks_are_residual():
    stack = pp.impala_stack(3, 16)
    assert stack(torch.zeros(2, 3, 64, 64)).shape == (2, 16, 32, 32)
    block = pp.ResidualBlock(8)
    torch.nn.init.zeros_(block.conv1.weight)
    torch.nn.init.zeros_(block.conv1.bias)
    x = torch.randn(2, 8, 16, 16)
    assert torch.equal(block(x), x)  # a zero residual branch leaves the input unchanged


def test_images_are_read_as_height_width_channels():
    """(N, 64, 64, 3) uint8 becomes (N, 3, 64, 64) in [0, 1]: a red image and a blue one give different
    features, and the channel-last permutation is the one the convolution sees."""
    agent = pp.Agent(IMAGES, gym.spaces.Discrete(15), "nature")
    x = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    x[..., 0] = 255
    seen = {}
    agent.network[0].register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0]))
    agent.hidden(x)
    assert seen["inp"].shape == (1, 3, 64, 64)
    assert seen["inp"][0, 0].min() == 1.0 and seen["inp"][0, 1:].max() == 0.0


def test_compute_gae_is_ppos_and_the_reward_scaler_is_ppo_continuous():
    assert inspect.getsource(pp.compute_gae) == inspect.getsource(ppo.compute_gae)
    for name in ("RunningMeanStd", "RewardScaler"):
        assert inspect.getsource(getattr(pp, name)) == inspect.getsource(getattr(ppo_continuous, name)), name


def test_reward_scaler_uses_the_discounted_return():
    # one env, rewards 1 with gamma 0.5: discounted returns 1, 1.5, 1.75, 1.875; population std of those
    scaler = pp.RewardScaler(num_envs=1, gamma=0.5)
    rewards = np.ones((4, 1), np.float32)
    zeros = np.zeros((4, 1), np.float32)
    scaled = scaler(rewards, zeros, np.ones((4, 1), np.float32))
    std = np.std([1.0, 1.5, 1.75, 1.875])
    assert scaled == pytest.approx(rewards / np.sqrt(std**2 + 1e-8), rel=1e-5)


@pytest.mark.parametrize("env_id", ["bigfish", "procgen-bigfish-v0", "procgen:procgen-bigfish-v0"])
def test_procgen_ids(env_id):
    assert pp.procgen_game(env_id) == "bigfish"


def test_procgen_adapter_speaks_the_vector_api():
    envs = pp.make_env("starpilot", 3, seed=0, num_levels=10, start_level=5)
    assert envs.backend == "procgen" and envs.protocol == "starpilot, easy, levels 5-14"
    assert envs.single_observation_space == IMAGES and envs.single_action_space == gym.spaces.Discrete(15)
    assert not envs.autoreset_next_step
    obs, info = envs.reset()
    assert obs.shape == (3, 64, 64, 3) and obs.dtype == np.uint8 and info == {}
    ended = 0
    for _ in range(400):
        obs, reward, terminated, truncated, info = envs.step(np.random.randint(0, 15, 3))
        assert obs.shape == (3, 64, 64, 3) and reward.dtype == np.float32
        assert terminated.dtype == bool and not truncated.any()
        ended += terminated.sum()
    assert ended > 0
    envs.close()


def test_same_seed_same_levels():
    def first_frames(seed):
        envs = pp.make_env("bigfish", 2, seed=seed)
        obs = envs.reset()[0]
        envs.close()
        return obs

    assert np.array_equal(first_frames(3), first_frames(3))
    assert not np.array_equal(first_frames(3), first_frames(4))


# ------------------------------------------------------------------------------------------------ loop
def test_procgen_steps_after_an_episode_end_are_trained_on(run_dir, monkeypatch):
    """Procgen resets within the step that ends an episode, so no step is an autoreset step: every mask is 1
    (with envpool or gymnasium the step after an end would be masked)."""
    masks, dones = [], []
    real_loss, real_gae = pp.ppo_loss, pp.compute_gae

    def spy_loss(*args, **kwargs):
        masks.append(named_args(real_loss, args, kwargs)["mask"].clone())
        return real_loss(*args, **kwargs)

    def spy_gae(*args, **kwargs):
        dones.append(named_args(real_gae, args, kwargs)["dones"].clone())
        return real_gae(*args, **kwargs)

    monkeypatch.setattr(pp, "ppo_loss", spy_loss)
    monkeypatch.setattr(pp, "compute_gae", spy_gae)
    pp.main(small_args(run_dir, num_steps=128, total_timesteps=512, num_test_envs=0))
    assert torch.cat(dones).sum() > 0  # episodes did end
    assert torch.cat(masks).min() == 1.0


def test_test_envs_play_the_full_level_distribution(run_dir, monkeypatch):
    """The levels actually played, as procgen reports them: training stays within --num-levels levels from
    --start-level; the test draws from all 2^31 levels (num_levels=0, where procgen ignores start_level), so
    it practically never meets a training level, and it is not 'the levels after the training ones'."""
    played = {}  # num_envs -> level seeds seen
    real_step = pp.ProcgenVectorEnv.step

    def spy_step(self, actions):
        out = real_step(self, actions)
        played.setdefault(self.num_envs, set()).update(out[4]["level_seed"].tolist())
        return out

    monkeypatch.setattr(pp.ProcgenVectorEnv, "step", spy_step)
    pp.main(
        small_args(
            run_dir, num_levels=50, start_level=100, num_test_envs=3, num_steps=128, total_timesteps=512
        )
    )
    train, test = played[2], played[3]
    assert train <= set(range(100, 150)) and len(train) > 2
    assert test.isdisjoint(range(100, 150)) and max(test) > 10**6 and len(test) > 3


# ------------------------------------------------------------------------------------------------ smoke
@pytest.mark.parametrize("network", ["impala", "nature"])
def test_smoke_bigfish_outputs_metrics_and_test_return(run_dir, network):
    # 2 envs x 128 steps, twice: random bigfish episodes last about 100 steps, so episodes end in both
    args = small_args(run_dir, network=network, num_steps=128, total_timesteps=512, save_model=True)
    summary = pp.main(args)
    check_run_outputs(summary, checkpoint=True)
    assert summary["global_step"] == 512 and summary["backend"] == "procgen"
    assert summary["test_episodic_return_mean_last100"] is not None
    scalars = read_scalars(summary["run_dir"])
    missing = [m for m in PPO_METRICS + ["charts/test_episodic_return"] if m not in scalars]
    assert not missing, missing
    assert len(scalars["losses/policy_loss"]) == 2
    ckpt = torch.load(f"{summary['run_dir']}/checkpoint.pt", weights_only=True)
    assert ckpt["args"]["network"] == network and ckpt["reward_scaler"]["rms"]["count"] > 0


def test_smoke_on_the_procgen_shaped_probes(run_dir):
    summary = pp.main(small_args(run_dir, env_id="probe_envs:Probe5Procgen-v0"))
    assert summary["backend"] == "gymnasium" and summary["episodes"] == 128


# ------------------------------------------------------------------------------------------------ learning
def test_probes_pass():
    """Probe 5: values and a policy that both depend on the image. Probes 1 to 4 add little here: GAE
    and the loss are word-for-word copies of ppo.py's (test_conventions.py), which passes all five, and the
    episode ends of this script's rollout are tested above. `python probe_envs.py --scripts
    ppo_procgen_impala.py` runs all five, five runs where this test makes one (measured 2026-11-23: 11 checks,
    all pass)."""
    import probe_envs

    assert probe_envs.main(["--scripts", "ppo_procgen_impala.py", "--probes", "5"]) == 0


def test_evaluation_samples_actions_as_the_paper_measures():
    """Greedy play stalls in many Procgen games (the argmax action can walk into a wall forever): evaluation
    samples from the policy, like training and like the Procgen paper's test."""
    agent = pp.Agent(IMAGES, gym.spaces.Discrete(2), "nature")
    calls = []
    real = agent.get_action
    agent.get_action = lambda x: calls.append(len(x)) or real(x)
    returns = pp.evaluate(agent, "probe_envs:Probe1Procgen-v0", 3, seed=1, device="cpu", backend="gymnasium")
    assert returns == [1.0, 1.0, 1.0] and calls  # one-step episodes of reward 1, each action sampled
