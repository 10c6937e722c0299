"""ppo_atari_multigpu.py on CPU: two ranks under torchrun with gloo (the same code runs NCCL on GPUs). One rank
is ppo_atari.py; two ranks hold identical weights, match ppo_atari.py's update over the same data, gather
every rank's episodes, resume, stop together on a signal that reaches one rank, and fail together when one
rank fails. No probe test here: two ranks' update is ppo_atari.py's on the same data (tested below), whose
probe test runs; `python probe_envs.py --scripts ppo_atari_multigpu.py` trains two ranks on all five probes
(measured: all 11 checks pass)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ppo_atari
import ppo_atari_multigpu
import tests.envs  # noqa: F401  (registers the counting envs)
from tests.conftest import ROOT, action_zero, last_json, read_scalars, small_args

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
COUNTING = "tests.envs:CountingAtari-v0"
# 4 envs in total (2 per rank) x 32 steps: iterations of 128 steps
FLAGS = ["--env-id", COUNTING, "--env-backend", "gymnasium", "--num-envs", "4", "--num-steps", "32"]
FLAGS += ["--num-minibatches", "2", "--update-epochs", "2", "--torch-threads", "1", "--no-cuda"]  # gloo


def torchrun(run_dir, out, *flags, ranks=2, env=None, wait=True):
    """ppo_atari_multigpu.py (through tests/dist_worker.py) on `ranks` gloo processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd += [os.path.join(ROOT, "tests", "dist_worker.py"), *FLAGS, "--run-dir", run_dir, *map(str, flags)]
    full_env = {**os.environ, "PYTHONPATH": ROOT, "RANK_OUT": str(out), "OMP_NUM_THREADS": "1", **(env or {})}
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True
    )
    if not wait:
        return popen
    try:
        stdout, stderr = popen.communicate(timeout=300)
    finally:
        stop(popen)
    return popen.returncode, stdout, stderr


def stop(popen):
    """Kill what is left of a torchrun process tree (its own session), if anything is."""
    if popen.poll() is None:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()


def rank_weights(out, ranks=2):
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(ranks)]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


def test_one_rank_is_ppo_atari(run_dir):
    """Without torchrun the script is one rank, and then exactly ppo_atari.py: same seed, same numbers."""
    kw = dict(env_id="probe_envs:Probe5Atari-v0", env_backend="gymnasium", total_timesteps=512, num_envs=4)
    kw.update(num_steps=32, save_model=True)
    single = ppo_atari.main(small_args("ppo_atari.py", run_dir, **kw))
    one_rank = ppo_atari_multigpu.main(small_args("ppo_atari_multigpu.py", run_dir, **kw))
    for key in ("global_step", "episodes", "episodic_return_mean_last100"):
        assert one_rank[key] == single[key], key
    assert "ranks" not in one_rank
    weights = [
        torch.load(os.path.join(r["run_dir"], "checkpoint.pt"), weights_only=True)["agent"]
        for r in (single, one_rank)
    ]
    assert_same_weights(*weights)


def test_two_ranks_hold_identical_weights_and_gather_every_episode(run_dir, tmp_path):
    """Different data at each rank (its own envs and random streams), the same weights after every update;
    rank 0 alone writes, and its summary counts the episodes of both ranks (a 3-step episode, then the
    autoreset step: one per 4 steps of each env)."""
    code, stdout, stderr = torchrun(
        run_dir, tmp_path, "--total-timesteps", "512", "--save-model"
    )  # progress on
    assert code == 0, stderr
    summary = last_json(stdout)
    assert summary["status"] == "finished" and summary["ranks"] == 2 and summary["global_step"] == 512
    assert summary["episodes"] == 4 * (512 // 4 // 4)  # 4 envs, 128 steps each
    assert stdout.count('"status"') == 1  # one JSON line: rank 1 prints nothing on stdout
    first, second = rank_weights(tmp_path)
    assert_same_weights(first, second)
    fresh = ppo_atari_multigpu.Agent(
        ppo_atari.gym.make(COUNTING).observation_space, ppo_atari.gym.spaces.Discrete(2)
    )
    assert any(not torch.equal(first[k], v) for k, v in fresh.state_dict().items())  # it did learn
    assert sorted(os.listdir(run_dir)) == [os.path.basename(summary["run_dir"])]  # one run directory
    assert os.path.exists(os.path.join(summary["run_dir"], "checkpoint.pt"))

    # resume across ranks: both ranks load rank 0's checkpoint and go on to the new budget
    ckpt = os.path.join(summary["run_dir"], "checkpoint.pt")
    code, stdout, stderr = torchrun(
        run_dir, tmp_path, "--resume", ckpt, "--total-timesteps", "768", "--no-progress"
    )
    assert code == 0, stderr
    resumed = last_json(stdout)
    assert resumed["status"] == "finished" and resumed["global_step"] == 768
    assert resumed["episodes"] == 4 * (768 // 4 // 4)
    assert_same_weights(*rank_weights(tmp_path))
    with open(os.path.join(summary["run_dir"], "args-512.json")) as f:  # rank 0's record of the resume
        assert json.load(f)["total_timesteps"] == 768


def test_two_ranks_match_ppo_atari_on_the_same_data(run_dir, tmp_path, monkeypatch):
    """One iteration, one minibatch per epoch: 2 ranks x 2 envs against ppo_atari.py with 4 envs, acting
    with action 0 so that both collect the same data. The averaged gradient is the single process's (its
    norm is logged: a sum over ranks would double it), and so are the weights after the update."""
    flags = dict(num_envs=4, num_steps=32, num_minibatches=1, update_epochs=2, total_timesteps=128)
    monkeypatch.setattr(ppo_atari.Agent, "get_action", action_zero)
    a = small_args(
        "ppo_atari.py", run_dir, env_id=COUNTING, env_backend="gymnasium", save_model=True, **flags
    )
    single = ppo_atari.main(a)
    expected = torch.load(os.path.join(single["run_dir"], "checkpoint.pt"), weights_only=True)["agent"]

    dist_dir = os.path.join(run_dir, "dist")
    code, stdout, stderr = torchrun(
        dist_dir,
        tmp_path,
        "--num-minibatches",
        "1",
        "--total-timesteps",
        "128",
        "--no-progress",
        env={"FIXED_ACTIONS": "1"},
    )
    assert code == 0, stderr
    summary = last_json(stdout)
    first, second = rank_weights(tmp_path)
    assert_same_weights(first, second)
    assert_same_weights(first, expected, atol=1e-5)
    norms = [read_scalars(s["run_dir"])["debug/grad_norm"][0][1] for s in (single, summary)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)


@pytest.mark.parametrize("how", ["SIGTERM to rank 1", "SIGINT to every process"])
def test_a_stop_signal_stops_every_rank_after_the_same_iteration(run_dir, tmp_path, how):
    """SIGTERM to rank 1 alone, or SIGINT to every process (as a scheduler may signal them all: each rank gets
    it directly, and torchrun, which starts each rank in a session of its own, passes it on once more; one
    stop, not a second signal): every rank stops after the same iteration, rank 0 writes the checkpoint and
    the summary (status interrupted, not aborted), and the weights agree."""
    proc = torchrun(run_dir, tmp_path, "--total-timesteps", "100000000", "--no-progress", wait=False)
    try:
        deadline = time.time() + 120
        # both ranks in their training loops (each has logged an iteration), however loaded the machine
        while not all(os.path.exists(tmp_path / f"logged{rank}") for rank in (0, 1)):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
        if how == "SIGTERM to rank 1":
            os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
        else:
            for pid in [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]:
                os.kill(pid, signal.SIGINT)
            os.killpg(proc.pid, signal.SIGINT)  # torchrun
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert stdout.strip().endswith("}"), stderr  # rank 0's JSON line came last
    summary = last_json(stdout)
    name = "SIGTERM" if how == "SIGTERM to rank 1" else "SIGINT"
    assert summary["status"] == "interrupted" and summary["signal"] == name, stderr
    assert 0 < summary["global_step"] < 100000000 and f"{name}: stopped" not in stderr  # (a second signal)
    ckpt = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=True)
    assert ckpt["global_step"] == summary["global_step"]
    first, second = rank_weights(tmp_path)
    assert_same_weights(first, second)
    assert_same_weights(first, ckpt["agent"])


def test_a_signal_during_the_stop_check_stops_every_rank_at_the_next_one(run_dir, tmp_path):
    """Rank 1 gets SIGINT while it waits in the second iteration's stop check, after its "no" has gone in:
    every rank (rank 1 too) goes on by the all-reduced answer, and all stop at the third check, after two
    iterations. (Had rank 1 stopped at once, alone, the other would wait for it in its next collective.)"""
    proc = torchrun(
        run_dir,
        tmp_path,
        "--total-timesteps",
        "100000",
        "--no-progress",
        env={"SIGNAL_RANK": "1"},
        wait=False,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert stdout.strip().endswith("}"), stderr
    summary = last_json(stdout)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT", stderr
    assert summary["global_step"] == 2 * 128 and "SIGINT: stopped" not in stderr
    ckpt = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=True)
    first, second = rank_weights(tmp_path)
    assert_same_weights(first, second)
    assert_same_weights(first, ckpt["agent"])


def test_a_failing_rank_fails_the_run_without_a_hang(run_dir, tmp_path):
    """Rank 1 fails at its second gradient all-reduce (one line, its status); rank 0 stops with one line
    (status "rank failed") instead of waiting forever, and torchrun exits non-zero. (torchrun adds its own
    report of the failed process after them.)"""
    start = time.time()
    code, stdout, stderr = torchrun(
        run_dir, tmp_path, "--total-timesteps", "100000", "--no-progress", env={"FAIL_RANK": "1"}
    )
    assert code != 0 and time.time() - start < 120
    summary = last_json(stdout)
    assert summary["status"] == "rank failed", stderr
    assert "error: another rank stopped" in stderr and "error: injected failure" in stderr
    assert "[rank0]: Traceback" not in stderr and "[rank1]: Traceback" not in stderr
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f)["status"] == "rank failed"


def test_only_distribution_differs_from_ppo_atari():
    """`diff ppo_atari.py ppo_atari_multigpu.py` shows what distribution adds: every other block is a
    word-for-word copy (the environment, the network, evaluation, GAE, the loss)."""
    import inspect

    names = [n for n, v in vars(ppo_atari).items() if inspect.isfunction(v) or inspect.isclass(v)]
    names = [n for n in names if getattr(vars(ppo_atari)[n], "__module__", None) == "ppo_atari"]
    differ = [
        n
        for n in names
        if inspect.getsource(getattr(ppo_atari, n)) != inspect.getsource(getattr(ppo_atari_multigpu, n))
    ]
    assert differ == ["Args", "train"], differ  # Args: --num-envs says it is the total over the ranks
