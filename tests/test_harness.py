"""The run harness's promises, tested once, on ppo.py: the harness below the fence is the same bytes in every
script (test_conventions.py checks that), and ppo.py runs fastest. Checkpoints are data, read on the CPU;
SIGINT and SIGTERM stop cleanly, also during evaluation, and a second signal quits without a traceback;
resume continues the learning-rate schedule and records the arguments it ran with; every failure is one line
on stderr, exit 1, and a JSON last line whose status names it; nothing is written before the input is known
to be good."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ppo
import tests.envs  # noqa: F401  (registers Counting-v0 and friends)
from tests.conftest import ROOT, last_json, read_scalars, run_cli, small_args, wait_for_an_iteration


def first_run(run_dir, **overrides):
    """A finished ppo.py run with its checkpoint: 2 iterations of 4 envs x 32 steps unless overridden."""
    summary = ppo.main(small_args("ppo.py", run_dir, save_model=True, **overrides))
    return summary, os.path.join(summary["run_dir"], "checkpoint.pt")


def one_error_line(proc, text):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert text in proc.stderr, proc.stderr


def snapshot(path):
    """Every file below path with its size and modification time: 'nothing changed' made checkable."""
    return {
        os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
        for d, _, files in os.walk(path)
        for f in files
    }


# ------------------------------------------------------------------------------------------- checkpoints
class RunsAShellCommand:
    """What a malicious checkpoint would carry: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("flag", ["--resume", "--eval-checkpoint"])
def test_a_checkpoint_holding_code_is_refused_and_runs_nothing(run_dir, tmp_path, flag):
    _, path = first_run(run_dir)
    ckpt = torch.load(path, weights_only=True)
    ckpt["extra"] = RunsAShellCommand(tmp_path / "ran")
    torch.save(ckpt, tmp_path / "crafted.pt")
    proc = run_cli("ppo.py", flag, tmp_path / "crafted.pt", "--run-dir", run_dir)
    one_error_line(proc, "cannot read checkpoint")
    assert "Weights only load failed" in proc.stderr
    assert last_json(proc.stdout)["status"] == "usage error"
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_is_read_on_the_cpu_as_data(run_dir, monkeypatch):
    _, path = first_run(run_dir)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ppo.main(ppo.parse_args(["--resume", path, "--total-timesteps", "384"]))
    assert calls and all(call == {"map_location": "cpu", "weights_only": True} for call in calls)
    ckpt = real_load(path, weights_only=True)
    # weights load on the CPU, and load_state_dict copies them to wherever the agent lives
    assert all(v.device.type == "cpu" for v in ckpt["agent"].values())


def test_an_incomplete_checkpoint_is_one_line(tmp_path, cli_here):
    torch.save({"format": ppo.CHECKPOINT["format"]}, tmp_path / "bare.pt")
    for flag in ("--resume", "--eval-checkpoint"):
        proc = cli_here("ppo.py", flag, tmp_path / "bare.pt", "--run-dir", tmp_path / "runs")
        one_error_line(proc, "is not a complete checkpoint of ppo.py")
    assert not (tmp_path / "runs").exists()


def test_checkpoint_flags_in_every_spelling_take_the_stored_arguments(run_dir):
    """tyro takes --eval_checkpoint and --resume=PATH too; so must the reading of the stored arguments. An
    evaluation does not inherit the run's saving, logging or video flags."""
    _, path = first_run(run_dir, seed=7)
    for argv in (
        ["--resume", path],
        [f"--resume={path}"],
        ["--eval_checkpoint", path],
        [f"--eval-checkpoint={path}"],
    ):
        args = ppo.parse_args(argv)
        assert args.seed == 7 and args.num_steps == 32, argv
        assert args.save_model == ("--resume" in argv[0]), argv


def test_a_checkpoint_for_other_shapes_is_one_line(run_dir, cli_here):
    summary, path = first_run(run_dir)
    before = snapshot(summary["run_dir"])
    for flag in ("--resume", "--eval-checkpoint"):
        proc = cli_here("ppo.py", flag, path, "--env-id", "Acrobot-v1", "--total-timesteps", "4096")
        one_error_line(proc, "does not fit this run's agent")
    assert snapshot(summary["run_dir"]) == before


# ------------------------------------------------------------------------------------------- signals
def start_cli(run_dir, *flags):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "ppo.py"), "--run-dir", run_dir, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    first = proc.stdout.readline()  # "run: <path> ..." once the run has started
    assert first.startswith("run: "), first + proc.stderr.read()
    return proc, first.split()[1]


def test_sigint_checkpoints_and_exits_130(run_dir):
    proc, path = start_cli(run_dir, "--total-timesteps", "50000000")
    wait_for_an_iteration(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = last_json(out)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert (
        torch.load(os.path.join(path, "checkpoint.pt"), weights_only=True)["global_step"]
        == summary["global_step"]
    )


def cpu_seconds(pid):  # user + system time of a process, from /proc (Linux)
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_second_signal_quits_at_once_without_a_traceback(run_dir):
    # iterations of 32k steps (over 2 s of CPU at this machine's fastest, on the one core the run is pinned
    # to). The first signal comes once the run has spent 0.3 s of CPU past its first progress line: inside
    # the second iteration however loaded the machine (the first's tail, after that line, takes about 1 ms;
    # a signal there would end the run cleanly before a second one came). The second signal comes once
    # the run has said it got the first (two at once would reach Python's handler as one).
    proc, path = start_cli(run_dir, "--total-timesteps", "50000000", "--num-steps", "8192")
    wait_for_an_iteration(proc)
    start = cpu_seconds(proc.pid)
    while cpu_seconds(proc.pid) < start + 0.3:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    said = []
    for line in proc.stderr:
        said.append(line)
        if line.startswith("SIGTERM: finishing this iteration"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    err = "".join(said) + err
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "SIGTERM: stopped" in err, err
    summary = last_json(out)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert not [f for f in os.listdir(path) if f.endswith(".tmp")]
    assert "checkpoint.pt" not in os.listdir(path)  # stopped mid-iteration: no checkpoint of half an update


def test_sigterm_during_evaluation_keeps_the_finished_run(run_dir):
    # the finished run's checkpoint and summary.json are written before evaluation starts; 10^5 greedy
    # episodes take far longer than the signal needs to arrive
    proc, path = start_cli(
        run_dir, "--total-timesteps", "512", "--num-steps", "32", "--eval-episodes", "100000", "--save-model"
    )
    for _ in range(1200):  # (summary.json is rewritten after every iteration: wait for the last one's)
        with contextlib.suppress(FileNotFoundError):  # (written to a .tmp file, then renamed: never half)
            if json.load(open(os.path.join(path, "summary.json")))["global_step"] == 512:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    summary = last_json(out)
    assert summary["status"] == "interrupted" and summary["global_step"] == 512
    assert "eval_return_mean" not in summary
    assert json.load(open(os.path.join(path, "summary.json"))) == summary
    # the checkpoint of the finished training, written before the evaluation began
    assert torch.load(os.path.join(path, "checkpoint.pt"), weights_only=True)["global_step"] == 512


# ------------------------------------------------------------------------------------------- resume
def test_resume_overrides_the_learning_rate_and_keeps_the_first_arguments(run_dir):
    summary, path = first_run(run_dir, anneal_lr=False, learning_rate=2e-3)
    ppo.main(ppo.parse_args(["--resume", path, "--total-timesteps", "512", "--learning-rate", "5e-4"]))
    rates = [v for _, v in read_scalars(summary["run_dir"])["charts/learning_rate"]]
    assert rates == pytest.approx([2e-3, 2e-3, 5e-4, 5e-4])
    assert torch.load(path, weights_only=True)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert json.load(open(os.path.join(summary["run_dir"], "args.json")))["learning_rate"] == 2e-3
    resumed = json.load(open(os.path.join(summary["run_dir"], "args-256.json")))  # resumed at step 256
    assert resumed["learning_rate"] == 5e-4 and resumed["resume"] == path


def test_resume_anneals_on_from_where_the_run_stopped(run_dir, monkeypatch):
    """Annealed over 16 iterations, a checkpoint kept at iteration 8. Resumed with the same budget, the rates
    are exactly those of the unbroken run; with another budget, rate * (1 - global_step / budget): on from
    the step reached to 0 at the new end."""
    kept = {}
    real_save = ppo.Run.save_checkpoint

    def save_and_keep(self):
        real_save(self)
        kept[self.iteration] = os.path.join(self.path, f"checkpoint.pt.{self.iteration}")
        shutil.copy(os.path.join(self.path, "checkpoint.pt"), kept[self.iteration])

    monkeypatch.setattr(ppo.Run, "save_checkpoint", save_and_keep)
    unbroken, _ = first_run(run_dir, total_timesteps=2048, save_interval=8)  # 16 iterations of 128 steps
    monkeypatch.setattr(ppo.Run, "save_checkpoint", real_save)
    rates = [v for _, v in read_scalars(unbroken["run_dir"])["charts/learning_rate"]]
    assert len(rates) == 16
    for total, expected_iterations in ((2048, 8), (1536, 4), (4096, 24)):
        path = os.path.join(run_dir, f"resume-{total}.pt")
        shutil.copy(kept[8], path)
        run = ppo.Run(ppo.parse_args(["--resume", path, "--total-timesteps", str(total)]))
        run.start(total, {})  # the schedule alone: no state objects
        assert run.global_step == 1024 and run.iteration == 8
        resumed = []
        for _ in range(expected_iterations):
            resumed.append(run.annealed(2.5e-4))
            run.global_step += 128
        if total == 2048:
            # exactly the same schedule, not just close to it (TensorBoard keeps float32)
            assert [float(np.float32(r)) for r in resumed] == rates[8:]
        else:
            assert resumed == [2.5e-4 * (1 - (1024 + 128 * i) / total) for i in range(expected_iterations)]
        run.writer.close()


def test_resuming_a_finished_run_changes_nothing(run_dir):
    summary, path = first_run(run_dir)
    before = snapshot(summary["run_dir"])
    proc = run_cli("ppo.py", "--resume", path)
    assert proc.returncode == 0, proc.stderr
    resumed = last_json(proc.stdout)
    for key in ("status", "global_step", "episodes", "episodic_return_mean_last100"):
        assert resumed[key] == summary[key], key
    assert snapshot(summary["run_dir"]) == before


# ------------------------------------------------------------------------------------------- failures
def test_a_non_finite_loss_is_one_line_and_a_json_status(run_dir):
    proc = run_cli(
        "ppo.py",
        *("--env-id", "tests.envs:CountingNaN-v0", "--env-backend", "gymnasium", "--run-dir", run_dir),
        *("--total-timesteps", "5000", "--num-steps", "32"),
    )
    one_error_line(proc, "non-finite loss at iteration")
    summary = last_json(proc.stdout)
    assert summary["status"] == "non-finite loss" and "non-finite loss at iteration" in summary["error"]


@pytest.mark.skipif(
    not os.path.exists("/dev/full"), reason="needs /dev/full, a device whose writes fail ENOSPC"
)
def test_a_full_disk_keeps_the_previous_checkpoint(run_dir):
    """The checkpoint's temporary file is made a link to /dev/full: every write to it fails with ENOSPC,
    exactly as on a full disk."""
    summary, path = first_run(run_dir)
    previous = open(path, "rb").read()
    os.symlink("/dev/full", path + ".tmp")
    proc = run_cli("ppo.py", "--resume", path, "--total-timesteps", "512", "--save-interval", "1")
    one_error_line(proc, "No space left on device")
    assert last_json(proc.stdout)["status"] == "no space left on device"
    assert not os.path.lexists(path + ".tmp") and open(path, "rb").read() == previous


def test_an_unwritable_run_dir_fails_before_writing(tmp_path, cli_here):
    (tmp_path / "a-file").write_text("")
    proc = cli_here("ppo.py", "--run-dir", tmp_path / "a-file" / "runs", "--total-timesteps", "512")
    one_error_line(proc, "--run-dir: cannot create")
    assert os.listdir(tmp_path) == ["a-file"]


def test_wandb_without_a_login_fails_before_writing(tmp_path):
    pytest.importorskip("wandb", reason="--track needs wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ppo.py"), "--track", "--run-dir", tmp_path / "runs"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    one_error_line(proc, "--track: W&B did not start")
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")  # no run directory


# ------------------------------------------------------------------------------------------- input
@pytest.mark.parametrize(
    "field, value",
    [("clip_coef", -1.0), ("clip_coef", 0.0), ("max_grad_norm", 0.0), ("max_grad_norm", -1.0)]
    + [("target_kl", -1.0), ("ent_coef", -0.01), ("vf_coef", -1.0), ("learning_rate", float("inf"))],
)
def test_meaningless_values_are_refused(field, value):
    with pytest.raises(ppo.UsageError, match=f"--{field.replace('_', '-')} must be"):
        ppo.Args(**{field: value})


def test_a_rounded_budget_is_said_and_unknown_ids_are_one_line(run_dir, cli_here):
    proc = cli_here("ppo.py", "--total-timesteps", "1000", "--run-dir", run_dir, "--no-progress")
    assert proc.returncode == 0
    assert "budget: 512 " in proc.stdout  # whole iterations of 512 steps
    assert last_json(proc.stdout)["global_step"] == 512
    # an Atari id: the closest id ppo.py can make, whose frames then name the script that runs them
    with pytest.raises(ppo.UsageError, match="unknown environment id 'BreakoutNoFrameskip-v4'; did you mean"):
        ppo.make_env("BreakoutNoFrameskip-v4", 1, 0)
    with pytest.raises(ppo.UsageError, match="use ppo_atari.py for"):
        ppo.check_spaces(ppo.make_env("Breakout-v5", 1, 0))
    with pytest.raises(ppo.UsageError, match="unknown environment id 'bigfish'"):
        ppo.make_env("bigfish", 1, 0)
    message = str(ppo.unknown_env_id("CartPol-v1", ["CartPole-v1", "CartPole-v1", "CartPole-v0"]))
    assert message.endswith("did you mean CartPole-v1, CartPole-v0?")  # each suggestion once


def test_pinning_one_core_is_for_one_torch_thread_only(run_dir):
    """Two torch threads on one pinned core spin against each other (a 20k-step run took minutes, not
    seconds): --pin-cpu pins only a run with one torch thread, and says where in the summary."""
    for threads, pinned in (("1", True), ("2", False)):
        flags = ["--torch-threads", threads, "--total-timesteps", "512", "--run-dir", run_dir]
        proc = run_cli("ppo.py", *flags, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert isinstance(last_json(proc.stdout)["cpu_core"], int) == pinned


def test_video_runs_print_nothing_on_stderr(run_dir):
    pytest.importorskip("moviepy", reason="--capture-video needs moviepy (the [video] extra)")
    env = {k: v for k, v in os.environ.items() if k not in ("SDL_VIDEODRIVER", "XDG_RUNTIME_DIR")}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ppo.py"), "--capture-video", "--total-timesteps", "256"]
        + ["--num-steps", "32", "--run-dir", run_dir],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "PYTHONPATH": ROOT},
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert os.listdir(os.path.join(last_json(proc.stdout)["run_dir"], "videos"))


def test_the_probe_runner_fails_when_it_checks_nothing():
    import probe_envs

    assert probe_envs.main(["--scripts", "ppo.py", "--probes", "9"]) == 2
    assert probe_envs.main(["--scripts", "reinforce.py", "--probes", "1"]) == 2  # REINFORCE runs 4 and 5
    assert probe_envs.main(["--scripts", "reinforce.py", "--probes", "4", "9"]) == 2  # 9 would go unchecked
