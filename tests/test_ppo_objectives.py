"""ppo_objectives.py: each objective's loss on hand-worked tensors, the exact Gaussian KL, the adaptive rule,
--objective clip against ppo_continuous.py bit for bit, every objective end to end, adaptive-kl's beta
across --resume, and its bad input."""

import math
import os

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import ppo_objectives as po
from tests.conftest import last_json, read_scalars, run_cli, small_args

OBJECTIVES = ["clip", "unclipped", "kl", "adaptive-kl", "pg"]
# Hopper's episodes end within a few dozen steps at first, so that these short runs have returns to compare
SIZES = dict(env_id="Hopper-v4", total_timesteps=768, num_envs=2, num_steps=128, num_minibatches=4)


def args(run_dir, **overrides):
    return small_args("ppo_objectives.py", run_dir, **{**SIZES, "update_epochs": 2, **overrides})


# ------------------------------------------------------------------------------------------------ unit
def hand_worked_batch():
    """Four steps, the last an autoreset step (mask 0): ratios 1.5, 0.5, 1, 2 against log pi_old = 0."""
    newlogprob = torch.log(torch.tensor([1.5, 0.5, 1.0, 2.0])).requires_grad_()
    batch = dict(
        newlogprob=newlogprob,
        oldlogprob=torch.zeros(4),
        advantages=torch.tensor([1.0, 1.0, -1.0, 2.0]),
        newvalue=torch.tensor([0.5, 0.0, 1.0, 3.0], requires_grad=True),
        oldvalue=torch.tensor([0.5, 0.0, 1.0, 3.0]),
        returns=torch.tensor([1.5, 0.0, 1.0, 0.0]),
        entropy=torch.full((4,), 2.0, requires_grad=True),
        mask=torch.tensor([1.0, 1.0, 1.0, 0.0]),
        kl=torch.tensor([0.1, 0.2, 0.3, 5.0]),
        beta=2.0,
    )
    return batch


# The policy term (to minimise) over the 3 valid steps, worked by hand with eps = 0.2, no normalisation:
#   clip:       min(r A, clip(r) A) = 1.2, 0.5, -1              -> -(0.7 / 3)
#   unclipped:  r A = 1.5, 0.5, -1                                -> -(1 / 3)
#   kl:         r A - 2 KL = 1.3, 0.1, -1.6                       -> 0.2 / 3  (adaptive-kl: the same)
#   pg:         A log pi = log 1.5, log 0.5, 0                    -> -(log 1.5 + log 0.5) / 3
# and its gradient with respect to log pi (d(r A)/d log pi = r A; the clipped step 1.5 has none):
HAND_WORKED = {
    "clip": (-0.7 / 3, [0.0, -0.5 / 3, 1 / 3, 0.0]),
    "unclipped": (-1 / 3, [-1.5 / 3, -0.5 / 3, 1 / 3, 0.0]),
    "kl": (0.2 / 3, [-1.5 / 3, -0.5 / 3, 1 / 3, 0.0]),
    "adaptive-kl": (0.2 / 3, [-1.5 / 3, -0.5 / 3, 1 / 3, 0.0]),
    "pg": (-(math.log(1.5) + math.log(0.5)) / 3, [-1 / 3, -1 / 3, 1 / 3, 0.0]),
}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_on_hand_worked_tensors(objective):
    """The policy term and its gradient are the hand-worked ones; the value loss, entropy and statistics are
    ppo_loss's whatever the objective, and the clipped term of ppo_loss leaves no gradient behind."""
    a = po.Args(objective=objective, norm_adv=False, total_timesteps=10**6)
    batch = hand_worked_batch()
    loss, stats = po.objective_loss(**batch, args=a)
    policy_loss, grad = HAND_WORKED[objective]
    assert stats["policy_loss"].item() == pytest.approx(policy_loss, abs=1e-6)
    loss.backward()
    assert torch.allclose(batch["newlogprob"].grad, torch.tensor(grad), atol=1e-6), batch["newlogprob"].grad
    # everything but the policy term: ppo_continuous.py's loss (value 0.5 * 1^2 / 3, entropy 2, no bonus)
    ppo_args = po.Args(norm_adv=False, total_timesteps=10**6)
    ppo = {k: v for k, v in batch.items() if k not in ("kl", "beta")}
    ref_loss, ref_stats = po.ppo_loss(**{**ppo, "newlogprob": ppo["newlogprob"].detach()}, args=ppo_args)
    assert (loss - stats["policy_loss"]).item() == pytest.approx((ref_loss - ref_stats["policy_loss"]).item())
    for k in ("value_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac"):
        assert stats[k].item() == pytest.approx(ref_stats[k].item()), k
    assert stats["value_loss"].item() == pytest.approx(0.5 * 1.0 / 3)
    assert batch["newvalue"].grad is not None  # the critic still learns


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_norm_adv_normalises_as_ppo_loss_does(objective):
    """With --norm-adv (the default) each objective sees the advantages that ppo_loss normalises: the same
    loss as on advantages normalised beforehand without it."""
    batch = hand_worked_batch()
    normalised = po.normalize_advantages(batch["advantages"], batch["mask"])
    on = po.objective_loss(**batch, args=po.Args(objective=objective, total_timesteps=10**6))
    off = po.objective_loss(
        **{**batch, "advantages": normalised},
        args=po.Args(objective=objective, norm_adv=False, total_timesteps=10**6),
    )
    assert on[0].item() == pytest.approx(off[0].item(), abs=1e-6)
    assert on[1]["policy_loss"].item() != pytest.approx(po.objective_loss(**batch, args=po.Args(
        objective=objective, norm_adv=False, total_timesteps=10**6))[1]["policy_loss"].item())  # fmt: skip


def test_clip_objective_is_ppo_loss_itself():
    a = po.Args(total_timesteps=10**6)
    batch = hand_worked_batch()
    loss, stats = po.objective_loss(**batch, args=a)
    del batch["kl"], batch["beta"]
    ref_loss, ref_stats = po.ppo_loss(**batch, args=a)
    assert torch.equal(loss, ref_loss) and all(torch.equal(stats[k], ref_stats[k]) for k in ref_stats)


def test_gaussian_kl_is_torchs_exact_kl():
    torch.manual_seed(0)
    mean_p, mean_q = torch.randn(7, 3), torch.randn(7, 3)
    logstd_p, logstd_q = torch.randn(1, 3) * 0.5, torch.randn(1, 3) * 0.5  # state-independent, broadcast
    kl = po.gaussian_kl(mean_p, logstd_p, mean_q, logstd_q)
    ref = kl_divergence(
        Normal(mean_p, logstd_p.exp().expand(7, 3)), Normal(mean_q, logstd_q.exp().expand(7, 3))
    ).sum(-1)
    assert kl.shape == (7,) and torch.allclose(kl, ref, atol=1e-5)
    assert torch.equal(po.gaussian_kl(mean_p, logstd_p, mean_p, logstd_p), torch.zeros(7))
    assert not torch.allclose(kl, po.gaussian_kl(mean_q, logstd_q, mean_p, logstd_p))  # KL(p||q) != KL(q||p)


@pytest.mark.parametrize(
    "kl, expected",
    [(0.0, 0.5), (0.0066, 0.5), (0.0067, 1.0), (0.01, 1.0), (0.0149, 1.0), (0.0151, 2.0), (1.0, 2.0)],
)
def test_adaptive_rule_on_both_sides_of_the_band(kl, expected):
    """d_targ = 0.01: halve below 0.01 / 1.5 = 0.00667, double above 0.015, keep in between."""
    assert po.adapt_kl_coef(1.0, kl, 0.01) == expected


# ------------------------------------------------------------------------------------------------ runs
def test_clip_is_ppo_continuous_bit_for_bit(tmp_path):
    """The same command line to both scripts: the same summary, the same metrics at every step, the same
    weights (the extra passes for the KL draw no random number and change nothing that clip uses)."""
    flags = ["--env-id", "Hopper-v4", "--seed", "5", "--total-timesteps", "1024", "--num-envs", "2"]
    flags += ["--num-steps", "128", "--num-minibatches", "4", "--update-epochs", "3", "--save-model"]
    # (--no-pin-cpu: both run in pytest's process)
    flags += ["--torch-threads", "1", "--no-pin-cpu", "--no-progress"]
    import ppo_continuous

    a, b = (
        m.main(m.parse_args(flags + ["--run-dir", str(tmp_path / m.SCRIPT)])) for m in (ppo_continuous, po)
    )
    assert a["episodes"] > 10 and a["global_step"] == 1024 and a["status"] == "finished"
    timing = ("sps", "wall_seconds", "run_dir")
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    scalars_a, scalars_b = read_scalars(a["run_dir"]), read_scalars(b["run_dir"])
    assert set(scalars_b) - set(scalars_a) == {"losses/kl"}  # (and no kl_coef: clip has no beta)
    for tag in set(scalars_a) - {"charts/SPS"}:
        assert scalars_a[tag] == scalars_b[tag], tag
    ckpt_a, ckpt_b = (torch.load(f"{s['run_dir']}/checkpoint.pt", weights_only=True) for s in (a, b))
    assert len(scalars_a["losses/policy_loss"]) == 3 and ckpt_a["agent"].keys() == ckpt_b["agent"].keys()
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # noqa: E731 (extra state)
    assert all(same(v, ckpt_b["agent"][k]) for k, v in ckpt_a["agent"].items())
    assert all(
        torch.equal(v, ckpt_b["reward_scaler"]["rms"][k]) for k, v in ckpt_a["reward_scaler"]["rms"].items()
    )


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_runs_end_to_end(objective, run_dir):
    summary = po.main(args(run_dir, objective=objective, save_model=True))
    assert summary["status"] == "finished" and summary["episodes"] > 0
    scalars = read_scalars(summary["run_dir"])
    assert len(scalars["losses/policy_loss"]) == 2  # 3 iterations, the first of which only measures
    kl = [v for _, v in scalars["losses/kl"]]
    assert all(k > 0 and math.isfinite(k) for k in kl)  # every update moved the policy, by a finite KL
    assert ("losses/kl_coef" in scalars) == (objective in ("kl", "adaptive-kl"))


def test_a_larger_beta_keeps_the_policy_closer(run_dir):
    """The penalty's gradient reaches the policy in train(): with beta 100 the updates move it far less
    (the KL after each update, losses/kl) than with beta 0.01 (no penalty to speak of), on the same data."""
    kls = {}
    for beta in (0.01, 100.0):
        summary = po.main(args(run_dir, objective="kl", kl_coef=beta, learning_rate=3e-3))
        kls[beta] = [v for _, v in read_scalars(summary["run_dir"])["losses/kl"]]
    assert kls[100.0][0] < kls[0.01][0] / 3, kls  # (the first update: the same rollout for both)


def test_adaptive_kl_adapts_beta_and_a_resume_continues_it(run_dir):
    """Logged beta follows the paper's rule from the logged d, the checkpoint holds the next beta, and a
    resumed run starts from it, not from --kl-coef. (d_targ 1e-4: about the KL that updates of these sizes
    make, so that beta changes.)"""
    first = po.main(args(run_dir, objective="adaptive-kl", kl_dtarg=1e-4, save_model=True))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    scalars = read_scalars(first["run_dir"])
    betas = [v for _, v in scalars["losses/kl_coef"]]
    kls = [v for _, v in scalars["losses/kl"]]
    stored = torch.load(path, weights_only=True)["kl_coef"]["value"].item()
    assert betas[0] == 1.0
    for beta, kl, following in zip(betas, kls, betas[1:] + [stored], strict=True):
        assert following == pytest.approx(po.adapt_kl_coef(beta, kl, 1e-4))
    assert len(set(betas + [stored])) > 1, (betas, kls)  # it did change
    sizes = ["--total-timesteps", "1280", "--no-progress"]  # (the rest: the checkpoint's arguments)
    second = po.main(
        po.parse_args(["--resume", path, *sizes, "--kl-coef", "0.123"])
    )  # (the checkpoint's wins)
    assert second["status"] == "finished"
    resumed = [
        v for step, v in read_scalars(first["run_dir"])["losses/kl_coef"] if step > first["global_step"]
    ]
    assert resumed and resumed[0] == stored
    # a fixed beta is the flag's, also on a resume
    fixed = po.main(args(run_dir, objective="kl", kl_coef=3.0, save_model=True))
    path = os.path.join(fixed["run_dir"], "checkpoint.pt")
    po.main(po.parse_args(["--resume", path, *sizes, "--kl-coef", "0.5"]))
    assert {v for _, v in read_scalars(fixed["run_dir"])["losses/kl_coef"]} == {3.0, 0.5}


def test_bad_kl_flags_are_one_line_and_write_nothing(tmp_path):
    proc = run_cli("ppo_objectives.py", "--kl-coef", "-1", "--run-dir", tmp_path / "runs")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --kl-coef must be > 0, got -1.0"
    assert last_json(proc.stdout)["status"] == "usage error"
    assert not (tmp_path / "runs").exists()
    for flags, message in [
        ({"kl_coef": 0.0}, "--kl-coef must be > 0, got 0.0"),
        ({"kl_dtarg": -0.01}, "--kl-dtarg must be > 0, got -0.01"),
        ({"kl_dtarg": float("nan")}, "--kl-dtarg must be > 0, got nan"),
        ({"kl_dtarg": float("inf")}, "--kl-dtarg must be > 0, got inf"),
    ]:
        with pytest.raises(po.UsageError) as e:
            po.Args(**flags)
        assert str(e.value) == message


def test_unknown_objective_is_refused_by_the_command_line(capsys):
    """tyro refuses a value outside the Literal (exit 2, as for any flag it cannot parse), naming the choices."""
    with pytest.raises(SystemExit) as e:
        po.parse_args(["--objective", "trpo"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "trpo" in err and "adaptive-kl" in err


def test_policy_probes_pass_on_adaptive_kl():
    """Probe 5 tests the policy, the part the objective changes, where the best action depends on the
    observation (4 is the same with one state; 1 to 3 test the critic, ppo_continuous.py's code, whose probe
    test runs 3 and 5; `python probe_envs.py --scripts ppo_objectives.py` runs all five)."""
    import probe_envs

    assert probe_envs.main(["--scripts", "ppo_objectives.py", "--probes", "5"]) == 0
