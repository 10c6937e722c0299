"""ppo_continuous.py: the running normaliser, the reward scaler, the Gaussian policy, action clipping, frozen
observation statistics within an iteration, checkpoint evaluation, outputs, and learning."""

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import ppo_continuous as pc
import tests.envs  # noqa: F401  (registers the counting envs)
from tests.conftest import (
    PPO_METRICS,
    check_run_outputs,
    last_json,
    named_args,
    read_scalars,
    run_cli,
    small_args,
)

CONTINUOUS_METRICS = [
    m for m in PPO_METRICS if m != "debug/relative_entropy"
]  # relative entropy: discrete only


def args(run_dir, **overrides):
    return small_args("ppo_continuous.py", run_dir, **overrides)


# ------------------------------------------------------------------------------------------------ unit
def test_running_mean_std_matches_numpy_over_the_stream():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 5)) for n in (1, 7, 64, 300)]
    rms = pc.RunningMeanStd((5,))
    for i, batch in enumerate(batches):
        rms.update(torch.as_tensor(batch, dtype=torch.float32))
        seen = np.concatenate(batches[: i + 1])
        assert np.allclose(rms.mean.numpy(), seen.mean(0), atol=1e-5)
        assert np.allclose(rms.var.numpy(), seen.var(0), rtol=1e-4)
        assert rms.count.item() == len(seen)


def test_reward_scaler_divides_by_the_std_of_the_discounted_return():
    rewards = np.array([[1.0, 2.0], [1.0, 0.0], [0.0, 4.0], [0.0, 1.0]], np.float32)
    dones = np.array([[0, 0], [1, 0], [0, 0], [0, 0]], np.float32)  # env 0's episode ends at step 1
    valid = np.array(
        [[1, 1], [1, 1], [0, 1], [1, 1]], np.float32
    )  # so step 2 is its autoreset step (reward 0)
    scaler = pc.RewardScaler(num_envs=2, gamma=0.5)
    scaled = scaler(rewards, dones, valid)
    # discounted returns, env 0: 1, 1.5, (0: autoreset, left out), 0 ; env 1: 2, 1, 4.5, 3.25
    returns = np.array([1.0, 1.5, 0.0, 2.0, 1.0, 4.5, 3.25])
    assert np.allclose(scaled, rewards / np.sqrt(returns.var() + 1e-8), atol=1e-6)
    assert np.allclose(scaler.discounted, [0.0, 3.25])  # carried over to the next rollout
    # one large reward after 199 small ones: 100 / std(returns) is about 14, clipped to 10
    rewards = np.full((200, 1), 0.01, np.float32)
    rewards[-1] = 100.0
    scaled = pc.RewardScaler(num_envs=1, gamma=0.5)(rewards, np.zeros((200, 1)), np.ones((200, 1)))
    assert scaled[-1, 0] == 10.0 and 0 < scaled[0, 0] < 0.01


def test_gaussian_policy_matches_torch_normal():
    import gymnasium as gym

    agent = pc.Agent(gym.spaces.Box(-5, 5, (4,)), gym.spaces.Box(-1, 1, (3,)))
    agent.obs_rms.update(torch.randn(100, 4) * 3 + 1)  # non-trivial normalisation
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([[0.3, -0.5, 0.0]]))
    x = torch.randn(6, 4) * 3
    torch.manual_seed(0)
    action, logprob, value = agent.get_action(x)
    assert logprob is None and value is None  # both come batched after the rollout
    ref = Normal(agent.actor_mean(agent.normalize(x)), agent.actor_logstd.exp())
    torch.manual_seed(0)
    assert torch.allclose(action, ref.sample(), atol=1e-6)  # the same draw: mean + std * N(0, 1)
    _, logprob, entropy, _ = agent.get_action_and_value(x, action)
    assert torch.allclose(logprob, ref.log_prob(action).sum(-1), atol=1e-5)
    assert torch.allclose(entropy, ref.entropy().sum(-1), atol=1e-5)
    assert torch.equal(agent.greedy_action(x), ref.mean)


def test_whether_to_normalise_is_loaded_with_the_weights():
    """An agent built with another norm_obs (a --no-norm-obs flag beside --eval-checkpoint, a probe check)
    takes the checkpoint's: the weights were trained on the inputs it says."""
    import gymnasium as gym

    spaces = gym.spaces.Box(-50, 50, (2,)), gym.spaces.Box(-1, 1, (1,))
    trained = pc.Agent(*spaces, norm_obs=True)
    trained.obs_rms.update(torch.randn(100, 2) * 20 + 5)
    loaded = pc.Agent(*spaces, norm_obs=False)
    loaded.load_state_dict(trained.state_dict())
    x = torch.randn(4, 2) * 20
    assert loaded.norm_obs and torch.equal(loaded.normalize(x), trained.normalize(x))


def test_no_norm_obs_passes_observations_through():
    import gymnasium as gym

    agent = pc.Agent(gym.spaces.Box(-50, 50, (2,)), gym.spaces.Box(-1, 1, (1,)), norm_obs=False)
    x = torch.tensor([[40.0, -30.0]])
    assert torch.equal(agent.normalize(x), x)


def test_log_prob_uses_the_unclipped_sample(run_dir, monkeypatch):
    """Pendulum's actions are bounded by +-2: samples beyond reach the update unclipped."""
    seen = []
    real = pc.Agent.get_action_and_value

    def spy(self, x, action=None):
        if action is not None:
            seen.append(action.detach().clone())
        return real(self, x, action)

    monkeypatch.setattr(pc.Agent, "get_action_and_value", spy)
    pc.main(args(run_dir, env_id="Pendulum-v1", env_backend="gymnasium", total_timesteps=1024, num_steps=256))
    actions = torch.cat([a.reshape(-1) for a in seen])
    assert (actions.abs() > 2.0).any()


def test_observation_statistics_are_frozen_within_an_iteration(run_dir, monkeypatch):
    """The first minibatch of every update sees the policy that collected the data: its ratio is 1 (4
    iterations, the first of which only measures the observations)."""
    first_kl = []
    real = pc.ppo_loss

    def spy(*a, **k):
        loss, stats = real(*a, **k)
        kw = named_args(real, a, k)
        first_kl.append((kw["newlogprob"] - kw["oldlogprob"]).abs().max().item())
        return loss, stats

    monkeypatch.setattr(pc, "ppo_loss", spy)
    a = args(run_dir, total_timesteps=4 * 128, num_steps=64, num_minibatches=4, update_epochs=2)
    pc.main(a)
    per_update = a.update_epochs * a.num_minibatches
    firsts = first_kl[::per_update]
    assert len(firsts) == 3 and max(firsts) < 1e-4, firsts  # the later minibatches do move away from 1
    assert max(first_kl) > 1e-3


# ------------------------------------------------------------------------------------------------ smoke
@pytest.mark.parametrize(
    "env_id, backend", [("HalfCheetah-v4", "envpool"), ("probe_envs:Probe5Continuous-v0", "gymnasium")]
)
def test_smoke_outputs_metrics_and_normalisation_in_checkpoint(env_id, backend, run_dir):
    summary = pc.main(args(run_dir, env_id=env_id, total_timesteps=768, num_steps=128, save_model=True))
    assert summary["backend"] == backend
    check_run_outputs(summary, checkpoint=True)
    scalars = read_scalars(summary["run_dir"])
    # (episodes are 1000 steps long in HalfCheetah: none ends within 512 steps, so no episodic_return yet)
    missing = [m for m in CONTINUOUS_METRICS if m not in scalars and not m.startswith("charts/episodic")]
    assert not missing, missing
    assert len(scalars["losses/policy_loss"]) == 2  # 3 iterations: the first only measures observations
    ckpt = torch.load(f"{summary['run_dir']}/checkpoint.pt", weights_only=True)
    assert ckpt["agent"]["_extra_state"] == {"norm_obs": True}  # travels with the weights (test below)
    rms = {k.split(".")[1]: v for k, v in ckpt["agent"].items() if k.startswith("obs_rms.")}
    assert torch.equal(rms["std"], torch.sqrt(rms["var"] + 1e-8))  # normalize()'s std, kept with the var
    # the statistics the last update used (2 iterations x 2 envs x 128 steps), and those of every step
    assert ckpt["agent"]["obs_rms.count"].item() == 512 and ckpt["agent"]["obs_rms_next.count"].item() == 768
    assert ckpt["reward_scaler"]["rms"]["count"].item() > 0


def test_updates_and_evaluation_use_the_statistics_the_policy_was_trained_with(run_dir, monkeypatch):
    """No update learns from raw observations (statistics of count 0, mean 0, variance 1: the first rollout
    only measures), and evaluation, after training and from --eval-checkpoint, normalises with the
    statistics of the policy's last update, not with ones that include the batch after it."""
    seen = {"update": [], "eval": []}
    real_update, real_greedy = pc.Agent.get_action_and_value, pc.Agent.greedy_action

    def stats(agent):
        return agent.obs_rms.count.item(), agent.obs_rms.mean.clone()

    def spy_update(self, x, action=None):
        seen["update"].append(stats(self))
        return real_update(self, x, action)

    def spy_greedy(self, x):
        seen["eval"].append(stats(self))
        return real_greedy(self, x)

    monkeypatch.setattr(pc.Agent, "get_action_and_value", spy_update)
    monkeypatch.setattr(pc.Agent, "greedy_action", spy_greedy)
    summary = pc.main(
        args(
            run_dir, env_id="InvertedPendulum-v4", total_timesteps=3 * 256, num_steps=128,
            eval_episodes=1, save_model=True,
        )
    )  # fmt: skip
    counts = [count for count, _ in seen["update"]]
    assert min(counts) > 0 and sorted(set(counts)) == [256, 512], counts  # iterations 2 and 3
    last_count, last_mean = seen["update"][-1]
    assert seen["eval"] and all(c == last_count and torch.equal(m, last_mean) for c, m in seen["eval"])

    seen["eval"].clear()
    ckpt = f"{summary['run_dir']}/checkpoint.pt"
    pc.main(args(run_dir, env_id="InvertedPendulum-v4", eval_checkpoint=ckpt, eval_episodes=1))
    assert seen["eval"] and all(c == last_count and torch.equal(m, last_mean) for c, m in seen["eval"])


def test_resume_continues_with_the_statistics_of_every_observation(run_dir, monkeypatch):
    """A resumed run's first update uses the checkpoint's obs_rms_next (all observations so far), as the
    next iteration of an unbroken run would; and one iteration with --norm-obs, which would only measure,
    is refused."""
    first = pc.main(
        args(run_dir, env_id="InvertedPendulum-v4", total_timesteps=512, num_steps=128, save_model=True)
    )
    path = f"{first['run_dir']}/checkpoint.pt"
    stored = torch.load(path, weights_only=True)["agent"]
    seen = []
    real = pc.Agent.get_action_and_value

    def spy(self, x, action=None):
        seen.append((self.obs_rms.count.item(), self.obs_rms.mean.clone()))
        return real(self, x, action)

    monkeypatch.setattr(pc.Agent, "get_action_and_value", spy)
    pc.main(pc.parse_args(["--resume", path, "--total-timesteps", "768", "--no-progress"]))
    assert seen[0][0] == stored["obs_rms_next.count"].item() == 512
    assert torch.equal(seen[0][1], stored["obs_rms_next.mean"])
    with pytest.raises(pc.UsageError, match="less than 2 batch"):
        pc.Args(total_timesteps=2048)  # 1 env x 2048 steps: one iteration
    assert pc.Args(total_timesteps=2048, norm_obs=False).num_iterations == 1


def test_eval_checkpoint_without_training(run_dir):
    summary = pc.main(
        args(run_dir, env_id="InvertedPendulum-v4", total_timesteps=512, num_steps=128, save_model=True)
    )
    ckpt = f"{summary['run_dir']}/checkpoint.pt"
    results = []
    for _ in range(2):
        proc = run_cli(
            "ppo_continuous.py",
            "--eval-checkpoint",
            ckpt,
            "--eval-episodes",
            "3",
            "--env-backend",
            "gymnasium",
        )
        assert proc.returncode == 0, proc.stderr
        results.append(last_json(proc.stdout))
    assert results[0]["env_id"] == "InvertedPendulum-v4" and results[0]["eval_episodes"] == 3
    del results[0]["wall_seconds"], results[1]["wall_seconds"]
    assert results[0] == results[1]  # the mean action and frozen statistics: deterministic


# ------------------------------------------------------------------------------------------------ learning
def test_probes_pass():
    """Probes 3 (discounting, through GAE) and 5 (a mean action and a value that both depend on the
    observation); 1, 2 and 4 check the same code on easier tasks. `python probe_envs.py --scripts
    ppo_continuous.py` runs all five (measured 2026-12-03: all pass)."""
    import probe_envs

    assert probe_envs.main(["--scripts", "ppo_continuous.py", "--probes", "3", "5"]) == 0


def test_inverted_pendulum_learns(run_dir):
    """Random play scores about 5. 49k steps (24 updates) of correct PPO measured 370; with the sign of
    the policy loss flipped, 3.0."""
    summary = pc.main(
        args(
            run_dir,
            env_id="InvertedPendulum-v4",
            total_timesteps=49152,
            num_envs=1,
            num_steps=2048,
            num_minibatches=32,
        )
    )
    assert summary["episodic_return_mean_last100"] >= 100, summary
