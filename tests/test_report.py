"""report.py: its verdicts on real runs of ppo.py (a healthy one, and two broken on purpose), on synthetic
event files for the edge cases (non-finite values, a missing metric, a REINFORCE run, a collapse, resumes),
its exit codes, --json, --group-by, the PNG's panels, and its speed on a run as long as a 10M-step Atari one."""

import json
import os
import struct
import time

import numpy as np
import pytest

import report
from tests.conftest import last_json, run_cli

STEP = 512  # environment steps per synthetic iteration (ppo.py's default batch)


# --------------------------------------------------------------------------------------------- helpers
def train(tmp_path_factory, name, *flags):
    """A real ppo.py run on CartPole-v1, seed 1; returns its run directory."""
    run_dir = tmp_path_factory.mktemp(name)
    cmd = ["--seed", "1", "--torch-threads", "1", "--no-progress", "--no-pin-cpu", "--run-dir", run_dir]
    p = run_cli("ppo.py", *cmd, *flags)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return last_json(p.stdout)["run_dir"]


def report_json(capsys, *argv):
    """report.main in this process with --json: (exit code, the JSON object)."""
    code = report.main([*map(str, argv), "--json"])
    return code, json.loads(capsys.readouterr().out)


def verdicts(result, run=0) -> dict:
    return {c["metric"]: c["verdict"] for c in result["runs"][run]["checks"]}


def healthy_scalars(n=200, seed=0) -> dict:
    """What a healthy discrete PPO run logs, n iterations: a rising return, KL and clipfrac in range, the
    relative entropy falling gradually, the critic learning, advantages centred."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, n)
    noise = lambda scale: scale * rng.standard_normal(n)  # noqa: E731
    return {
        "charts/episodic_return": 20 + 400 * x + noise(20),
        "charts/episodic_length": 20 + 400 * x,
        "charts/learning_rate": 2.5e-4 * (1 - x),
        "charts/SPS": 3000 + noise(50),
        "losses/policy_loss": noise(0.01),
        "losses/value_loss": 10 * (1 - x) + 1,
        "losses/entropy": 0.69 * (1 - 0.5 * x),
        "losses/old_approx_kl": 0.004 + noise(0.001),
        "losses/approx_kl": 0.004 + np.abs(noise(0.001)),
        "losses/clipfrac": 0.08 + np.abs(noise(0.01)),
        "losses/explained_variance": 0.8 * x + noise(0.05),
        "debug/relative_entropy": 1 - 0.5 * x,
        "debug/residual_variance": 1 - 0.8 * x,
        "debug/advantage_mean": noise(0.1),
        "debug/advantage_std": 1 + noise(0.05),
        "debug/grad_norm": 0.4 + np.abs(noise(0.1)),
    }


def write_run(path, scalars, args=None, summary="finished", new_style=False):
    """A run directory as the scripts write it: TensorBoard events, args.json, summary.json (summary=None:
    none, as while a run is going)."""
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(path, exist_ok=True)
    writer = SummaryWriter(str(path))
    n = max(len(v) for v in scalars.values())
    for i in range(n):
        for tag, values in scalars.items():
            if i < len(values):
                writer.add_scalar(tag, float(values[i]), (i + 1) * STEP, new_style=new_style)
    writer.close()
    base = {"exp_name": "ppo", "env_id": "CartPole-v1", "seed": 1, "max_grad_norm": 0.5}
    with open(os.path.join(path, "args.json"), "w") as f:
        json.dump({**base, **(args or {})}, f)
    if summary is not None:
        returns = scalars.get("charts/episodic_return", [np.nan])
        done = {
            "status": summary,
            "global_step": n * STEP,
            "episodic_return_mean_last100": float(returns[-1]),
        }
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump(done, f)
    return str(path)


def checks_of(path) -> dict:
    """{metric: Check} of one run directory (no PNG: the tests of the checks alone stay fast)."""
    (run,) = report.load_runs([str(path)])
    return {c.metric: c for c in report.check_run(run)}


def figure_of(*paths, group_by=None):
    """The report's figure for these run directories, as main() draws it."""
    runs = report.load_runs([str(p) for p in paths])
    checks = {run.path: report.check_run(run) for run in runs}
    return report.build_figure(runs, checks, report.group_runs(runs, group_by))


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


# ------------------------------------------------------------------------------------- real ppo.py runs
# One test per run, so that pytest-xdist never trains the same run in both of its workers.
def printed_verdicts(stdout) -> dict:
    """{metric: verdict} from report.py's printed lines."""
    lines = [line.split(None, 2) for line in stdout.splitlines()]
    return {words[1]: words[0] for words in lines if words and words[0] in report.VERDICTS}


def test_healthy_ppo_run_has_no_fail_and_a_png_with_every_panel(tmp_path_factory):
    """ppo.py's defaults on CartPole-v1, a short budget (32 updates), reported from the command line."""
    run = train(tmp_path_factory, "healthy", "--total-timesteps", "16384")
    p = run_cli("report.py", run)
    assert p.returncode == 0, p.stdout + p.stderr
    v = printed_verdicts(p.stdout)
    assert "FAIL" not in v.values(), p.stdout
    # a run of the defaults gets no WARN for KL or clipfrac (the bands are one-sided)
    assert v["losses/approx_kl"] == v["losses/clipfrac"] == "PASS"
    assert v["charts/episodic_return"] == "PASS"  # 16k steps are enough to see CartPole's return rise
    # every check of a PPO run is there
    for metric in ("losses/explained_variance", "debug/relative_entropy", "debug/grad_norm", "all_metrics"):
        assert metric in v

    # a line per check: verdict, metric, what was measured, what it means; then the PNG; then the counts
    lines = p.stdout.strip().splitlines()
    checks = [line for line in lines if line.split()[0] in report.VERDICTS]
    for line in checks:
        assert "  " in line.split(None, 2)[2]  # what was measured, then the likely cause or what it means
    fails = sum(line.startswith("FAIL") for line in checks)
    warns = sum(line.startswith("WARN") for line in checks)
    assert lines[-1] == f"{len(checks) - fails - warns} PASS, {warns} WARN, {fails} FAIL (1 run)"
    png = os.path.join(run, "report.png")  # the default --out for one run
    assert lines[-2] == f"report: {png}"
    assert png_size(png) == (1560, 990)  # 3 x 3 panels of 5.2 x 3.3 inches at 100 dpi

    titles = [ax.get_title() for ax in figure_of(run).axes]
    assert [t.split(":")[0] for t in titles] == [
        "charts/episodic_return",
        "losses/approx_kl",
        "losses/clipfrac",
        "debug/relative_entropy",
        "debug/residual_variance",
        "debug/advantage_mean and _std",
        "debug/grad_norm",
        "charts/learning_rate",
        "charts/SPS",
    ]
    assert titles[1] == "losses/approx_kl: PASS"


def test_far_too_high_learning_rate_and_epochs_fail_the_kl_check_only(tmp_path_factory):
    """A learning rate 200x too high, not annealed, and 40 epochs instead of 4: each update moves the policy
    far (a median approx KL near 0.2), though CartPole's return still rises."""
    flags = ["--learning-rate", "0.05", "--no-anneal-lr", "--update-epochs", "40"]
    run = train(tmp_path_factory, "high_kl", "--total-timesteps", "8192", *flags)
    p = run_cli("report.py", run, "--json")
    assert p.returncode == 1, p.stderr
    result = json.loads(p.stdout)  # one JSON object, nothing else
    v = verdicts(result)
    assert v["losses/approx_kl"] == "FAIL", result
    assert result["counts"]["FAIL"] >= 1
    # the critic, the advantages, the gradients and the logging are not what is wrong
    unrelated = [
        "losses/explained_variance",
        "debug/advantage_mean",
        "debug/advantage_std",
        "debug/grad_norm",
    ]
    for metric in unrelated + ["all_metrics", "summary/status"]:
        assert v[metric] == "PASS", (metric, result)


def test_frozen_critic_fails_the_explained_variance_check_only(tmp_path_factory, capsys):
    """--vf-coef 0: the critic (a separate network in ppo.py) gets no gradient and never learns. 51 updates:
    report.py judges a critic that never learned from 50 on (CartPole's can take that long to start)."""
    run = train(tmp_path_factory, "frozen_critic", "--total-timesteps", "26112", "--vf-coef", "0")
    assert report.main([run]) == 1
    printed = capsys.readouterr().out
    v = printed_verdicts(printed)
    assert v["losses/explained_variance"] == "FAIL", printed
    for metric in ("losses/approx_kl", "losses/clipfrac", "debug/relative_entropy", "debug/grad_norm"):
        assert v[metric] == "PASS", (metric, printed)
    line = next(line for line in printed.splitlines() if line.startswith("FAIL  losses/explained_variance"))
    assert "--vf-coef" in line


# --------------------------------------------------------------------------------------- synthetic runs
def test_synthetic_healthy_run_passes_everything(tmp_path, capsys):
    code, result = report_json(capsys, write_run(tmp_path / "run", healthy_scalars()))
    assert code == 0
    assert set(verdicts(result).values()) == {"PASS"}, result
    assert result["counts"] == {"PASS": len(result["runs"][0]["checks"]), "WARN": 0, "FAIL": 0}
    assert os.path.exists(result["png"])


def test_non_finite_value_is_a_fail_but_an_undefined_explained_variance_is_not(tmp_path, capsys):
    s = healthy_scalars()
    s["losses/value_loss"][50] = np.nan
    s["losses/explained_variance"][10:15] = np.nan  # constant returns: undefined, not a fault
    s["debug/residual_variance"][10:15] = np.nan
    code, result = report_json(capsys, write_run(tmp_path / "run", s))
    assert code == 1
    checks = {c["metric"]: c for c in result["runs"][0]["checks"]}
    assert checks["losses/value_loss"]["verdict"] == "FAIL"
    assert f"at step {51 * STEP:,}" in checks["losses/value_loss"]["measured"]
    assert "all_metrics" not in checks  # its PASS line gives way to the metric that failed
    assert checks["losses/explained_variance"]["verdict"] == "PASS"
    assert "undefined on 5 updates" in checks["losses/explained_variance"]["measured"]
    assert [m for m, c in checks.items() if c["verdict"] != "PASS"] == ["losses/value_loss"]
    assert result["runs"][0]["final_return"] is not None  # the JSON is standard: no NaN in it


def test_missing_metric_skips_its_check_and_panel(tmp_path):
    s = healthy_scalars()
    del s["losses/approx_kl"]
    path = write_run(tmp_path / "run", s)
    checks = checks_of(path)
    assert "losses/approx_kl" not in checks and "losses/clipfrac" in checks
    fig = figure_of(path)
    assert len(fig.axes) == 8 and not any("approx_kl" in ax.get_title() for ax in fig.axes)


def test_reinforce_run_gets_the_checks_of_what_it_logs(tmp_path):
    s = healthy_scalars()
    kept = ["charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS"]
    kept += ["losses/policy_loss", "losses/entropy", "debug/relative_entropy", "debug/grad_norm"]
    s = {k: s[k] for k in kept}
    s["debug/return_mean"] = s["debug/return_std"] = np.ones(200)
    path = write_run(tmp_path / "run", s, args={"exp_name": "reinforce", "max_grad_norm": None})
    checks = checks_of(path)
    v = {m: c.verdict for m, c in checks.items()}
    assert set(v) == {
        "summary/status",
        "charts/episodic_return",
        "debug/relative_entropy",
        "debug/grad_norm",
        "all_metrics",
    }
    assert set(v.values()) == {"PASS"}
    assert "not clipped" in checks["debug/grad_norm"].advice
    fig = figure_of(path)
    assert len(fig.axes) == 5  # return, relative entropy, grad norm, learning rate, SPS


@pytest.mark.parametrize(
    "returns, verdict, word",
    [
        (np.r_[np.linspace(20, 500, 100), np.linspace(500, 60, 100)], "FAIL", "collapsed"),
        (np.r_[np.linspace(20, 500, 100), np.linspace(500, 330, 100)], "WARN", "fell from its peak"),
        (np.full(200, 22.0), "WARN", "constant"),
        (np.linspace(500, 20, 200), "WARN", "falling"),
    ],
)
def test_return_trend(tmp_path, returns, verdict, word):
    s = healthy_scalars()
    s["charts/episodic_return"] = returns + np.random.default_rng(1).normal(0, 5, 200) * (np.ptp(returns) > 0)
    check = checks_of(write_run(tmp_path / "run", s))["charts/episodic_return"]
    assert check.verdict == verdict and word in check.advice, check


@pytest.mark.parametrize("seed", range(5))
def test_noisy_flat_return_is_flat_not_a_collapse(tmp_path, seed):
    """The best window of a flat, noisy curve is a little above the rest: no peak, no collapse."""
    s = healthy_scalars()
    s["charts/episodic_return"] = 20 + np.random.default_rng(seed).normal(0, 5, 200)
    check = checks_of(write_run(tmp_path / "run", s))["charts/episodic_return"]
    assert check.verdict == "WARN" and "flat" in check.advice, check


@pytest.mark.parametrize(
    "tag, values, metric, verdict, word",
    [
        ("losses/approx_kl", np.r_[np.full(199, 0.004), 0.3], "losses/approx_kl", "WARN", "spikes"),
        ("losses/approx_kl", np.full(200, 0.03), "losses/approx_kl", "WARN", "large"),
        ("losses/clipfrac", np.full(200, 0.5), "losses/clipfrac", "FAIL", "most ratios clipped"),
        ("debug/relative_entropy", np.r_[1.0, np.full(199, 0.02)], "debug/relative_entropy", "WARN", "early"),
        ("debug/relative_entropy", np.full(200, 0.99), "debug/relative_entropy", "WARN", "never falling"),
        ("debug/advantage_mean", np.full(200, -3.0), "debug/advantage_mean", "WARN", "far from zero"),
        ("debug/advantage_std", np.geomspace(1, 100, 200), "debug/advantage_std", "PASS", "grows with"),
        ("debug/grad_norm", np.full(200, 0.9), "debug/grad_norm", "PASS", "every update"),
        ("debug/grad_norm", np.full(200, 900.0), "debug/grad_norm", "WARN", "clipped hard"),
    ],
)
def test_one_bad_metric_is_flagged_by_its_own_check(tmp_path, tag, values, metric, verdict, word):
    s = healthy_scalars()
    s[tag] = values
    checks = checks_of(write_run(tmp_path / "run", s))
    assert checks[metric].verdict == verdict and word in checks[metric].advice, checks[metric]
    others = {m: c.verdict for m, c in checks.items() if m != metric}
    assert set(others.values()) == {"PASS"}, others


def test_advantage_std_drifting_with_a_flat_return_warns(tmp_path):
    s = healthy_scalars()
    s["charts/episodic_return"] = 20 + np.random.default_rng(2).normal(0, 5, 200)
    s["debug/advantage_std"] = np.geomspace(1, 100, 200)
    assert checks_of(write_run(tmp_path / "run", s))["debug/advantage_std"].verdict == "WARN"


@pytest.mark.parametrize(
    "status, verdict",
    [("non-finite loss", "FAIL"), ("crashed", "FAIL"), ("interrupted", "WARN"), (None, "WARN")],
)
def test_status_from_summary_json(tmp_path, status, verdict):
    """A run that stopped on a non-finite loss never logged it: summary.json says so. No summary.json: the
    run is still going (or was killed)."""
    check = checks_of(write_run(tmp_path / "run", healthy_scalars(), summary=status))["summary/status"]
    assert check.verdict == verdict


def test_resumed_run_keeps_the_latest_value_of_a_step_logged_twice(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    path = str(tmp_path / "run")
    first = SummaryWriter(path, filename_suffix=".1")
    for step in (1, 2, 3):
        first.add_scalar("losses/approx_kl", 0.1 * step, step)
    first.close()
    time.sleep(1.1)  # the next file's name (its unix time) sorts after
    second = SummaryWriter(path, filename_suffix=".2")
    for step in (3, 4):  # the resumed run does step 3 again
        second.add_scalar("losses/approx_kl", 1.0 * step, step)
    second.close()
    steps, values = report.read_scalars(path)["losses/approx_kl"]
    assert steps.tolist() == [1, 2, 3, 4]
    assert np.allclose(values, [0.1, 0.2, 3.0, 4.0])


def test_new_style_tensor_scalars_are_read(tmp_path):
    path = write_run(tmp_path / "run", {"losses/approx_kl": [0.5, 0.25]}, new_style=True)
    steps, values = report.read_scalars(path)["losses/approx_kl"]
    assert steps.tolist() == [STEP, 2 * STEP] and np.allclose(values, [0.5, 0.25])


# ------------------------------------------------------------------------------------ several runs
def test_group_by_prints_mean_and_std_over_seeds_and_overlays_the_groups(tmp_path, capsys):
    finals = {"impala": [300.0, 340.0], "nature": [100.0, 120.0, 140.0]}
    for network, returns in finals.items():
        for seed, final in enumerate(returns):
            s = healthy_scalars(60, seed=seed)
            s["charts/episodic_return"][-1] = final
            write_run(tmp_path / "runs" / f"{network}{seed}", s, args={"network": network, "seed": seed})
    out = tmp_path / "groups.png"
    # the folder that holds the runs stands for all of them
    code, result = report_json(capsys, tmp_path / "runs", "--group-by", "network", "--out", out)
    assert code == 0 and len(result["runs"]) == 5
    groups = {g["group"]: g for g in result["groups"]}
    assert groups["network=impala"]["runs"] == 2
    assert groups["network=impala"]["final_return_mean"] == pytest.approx(320.0)
    assert groups["network=nature"]["final_return_std"] == pytest.approx(np.std([100.0, 120.0, 140.0]))
    assert os.path.exists(out)

    assert report.main([str(tmp_path / "runs"), "--group-by", "network", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GROUP  network=impala  final return 320 ± 20 over 2 seed(s)" in printed
    fig = figure_of(tmp_path / "runs", group_by="network")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "network=impala (2 runs)" in labels and "network=nature (3 runs)" in labels


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_exit_code_two(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_cli("report.py", empty)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "no TensorBoard event files" in p.stderr

    p = run_cli("report.py", tmp_path / "missing")
    assert p.returncode == 2 and "no such directory" in p.stderr and p.stderr.count("\n") == 1

    run = write_run(tmp_path / "run", healthy_scalars(20))
    p = run_cli("report.py", run, "--group-by", "network")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "--group-by network: not a field of" in p.stderr and "exp_name" in p.stderr


def test_not_an_event_file_is_one_line(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "events.out.tfevents.1.host.1.0").write_bytes(struct.pack("<Q", 4) + b"\0" * 4 + b"\xff" * 8)
    with pytest.raises(report.ReportError, match="not a TensorBoard event file"):
        report.read_scalars(str(path))


# ------------------------------------------------------------------------------------------------- speed
def write_events_quickly(path, scalars):
    """An event file as SummaryWriter writes it (one Event per scalar, TFRecord-framed), serialised here in
    bulk because SummaryWriter takes tens of seconds for this many scalars. The CRCs are left 0: report.py
    does not read them (tensorboard would refuse this file; test_events_are_read_as_tensorboard_reads_them
    checks the reader against tensorboard on a real one)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    os.makedirs(path, exist_ok=True)
    chunks = []
    for i in range(max(len(v) for v in scalars.values())):
        for tag, values in scalars.items():
            value = Summary.Value(tag=tag, simple_value=float(values[i]))
            data = Event(step=(i + 1) * 1024, wall_time=i, summary=Summary(value=[value])).SerializeToString()
            chunks += [struct.pack("<QI", len(data), 0), data, b"\0\0\0\0"]
    with open(os.path.join(path, "events.out.tfevents.1.host.1.0"), "wb") as f:
        f.write(b"".join(chunks))
    with open(os.path.join(path, "args.json"), "w") as f:
        json.dump({"exp_name": "ppo_atari", "env_id": "BreakoutNoFrameskip-v4", "max_grad_norm": 0.5}, f)
    return str(path)


def test_a_10m_step_atari_run_takes_seconds(tmp_path, capsys):
    """A 10M-step ppo_atari.py run logs 9,765 iterations of 16 metrics: 156k scalars. The issue's target is
    under 5 s on an idle machine. The bound is on this process's CPU time, which other jobs on the machine do
    not stretch as they stretch the wall clock."""
    path = write_events_quickly(tmp_path / "run", healthy_scalars(9765))
    start = time.process_time()
    code, result = report_json(capsys, path)
    cpu_seconds = time.process_time() - start
    assert code == 0 and os.path.exists(result["png"])
    finite = next(c for c in result["runs"][0]["checks"] if c["metric"] == "all_metrics")
    assert finite["measured"] == f"16 metrics, {16 * 9765:,} values"  # every point was read
    assert verdicts(result)["charts/episodic_return"] == "PASS"
    assert cpu_seconds < 30, cpu_seconds


def test_events_are_read_as_tensorboard_reads_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write_run(tmp_path / "run", healthy_scalars(300))
    scalars = report.read_scalars(path)
    (name,) = [n for n in os.listdir(path) if n.startswith("events")]
    acc = EventAccumulator(os.path.join(path, name), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(scalars)
    for tag in scalars:
        events = acc.Scalars(tag)
        assert scalars[tag][0].tolist() == [e.step for e in events]
        assert np.allclose(scalars[tag][1], [e.value for e in events])
