"""What docs/conventions.md asks of every script, tested on each: outputs, the JSON summary line, resume,
stop signals, the non-finite guard, argument errors, determinism, evaluation, video, W&B, the run harness
below the fence staying byte-identical and the shared blocks word-for-word copies. The harness's own
promises, tested once on ppo.py, are in test_harness.py."""

import inspect
import json
import math
import os
import signal
import subprocess
import sys

import gymnasium as gym
import pytest
import torch

import tests.envs  # noqa: F401  (registers Counting-v0 and friends)
from tests.conftest import (
    CLI_FLAGS,
    CLI_STEPS,
    COUNTING,
    DEFAULT_ENV,
    ROOT,
    SMALL,
    check_run_outputs,
    last_json,
    load_script,
    read_scalars,
    run_cli,
    small_args,
    wait_for_an_iteration,
)

SCRIPTS = list(SMALL)
# Optimizer steps that one iteration takes, per parameter: PPO epochs x minibatches (4 x 4 for ppo.py,
# 10 x 4 for ppo_continuous.py with SMALL's sizes); REINFORCE one; the baseline one for the policy and
# value_epochs (20) for the critic (the policy loss gives the critic no gradient; Adam skips it then).
STEPS_PER_ITERATION = {
    "ppo.py": [16],
    "reinforce.py": [1],
    "reinforce_baseline.py": [1, 20],
    "ppo_continuous.py": [40],
    "ppo_objectives.py": [40],
    "ppo_atari.py": [16],
    "ppo_procgen_impala.py": [24],  # 3 epochs x 8 minibatches
}
MEASURE_FIRST = ("ppo_continuous.py", "ppo_objectives.py")  # (the MuJoCo scripts: observation statistics)
# A fast environment of each script's kind for the tests that play whole episodes on gymnasium, and one
# that can render for the video test (the probes cannot; an untrained Breakout game is short).
QUICK_ENV = {
    **DEFAULT_ENV,
    "ppo_continuous.py": "InvertedPendulum-v4",
    "ppo_objectives.py": "InvertedPendulum-v4",
    "ppo_atari.py": "probe_envs:Probe1Atari-v0",
    "ppo_procgen_impala.py": "probe_envs:Probe1Procgen-v0",
}
VIDEO_ENV = {**QUICK_ENV, "ppo_atari.py": "Breakout-v5", "ppo_procgen_impala.py": "bigfish"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_prints_summary_as_last_line(script, run_dir):
    steps = CLI_STEPS[script]
    proc = run_cli(
        script, *CLI_FLAGS[script], "--total-timesteps", steps, "--run-dir", run_dir, "--seed", "3"
    )
    assert proc.returncode == 0, proc.stderr
    summary = last_json(proc.stdout)
    path = summary["run_dir"]
    check_run_outputs(summary)
    backend = "procgen" if script == "ppo_procgen_impala.py" else "envpool"
    assert summary["seed"] == 3 and summary["backend"] == backend and summary["global_step"] >= steps
    assert json.load(open(os.path.join(path, "args.json")))["seed"] == 3
    assert os.path.basename(path).startswith(f"{DEFAULT_ENV[script]}__{script[:-3]}__3__")
    assert proc.stderr == ""  # no warnings or notices on a normal run
    # the progress line, about every tenth of the budget (--no-progress: test_harness.py)
    progress = [line.split() for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert 1 <= len(progress) <= 11 and all(p[2] == "return(last100)" and p[4] == "SPS" for p in progress)
    assert [int(p[1]) for p in progress] == sorted(int(p[1]) for p in progress) and int(progress[0][1]) > 0


BAD_INPUT = [
    (["--env-id", "CartPol-v1"], "unknown environment id 'CartPol-v1'; did you mean CartPole-v1"),
    (["--env-id", "no_such_module:Thing-v0"], "cannot import its module"),
    (["--resume", "/nonexistent/checkpoint.pt"], "cannot read checkpoint '/nonexistent/checkpoint.pt'"),
    (["--eval-checkpoint", "/nonexistent.pt"], "cannot read checkpoint '/nonexistent.pt'"),
    (["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
    (["--learning-rate", "nan"], "--learning-rate must be > 0, got nan"),
]
CUDAGRAPHS_ON_CPU = (["--cudagraphs", "--no-cuda"], "--cudagraphs needs a CUDA device")
# An environment whose observations the script cannot take, and the message that names the right script.
WRONG_OBSERVATIONS = {s: ("probe_envs:Probe1Atari-v0", "needs vector observations") for s in SCRIPTS}
WRONG_OBSERVATIONS["ppo_atari.py"] = ("probe_envs:Probe1-v0", "needs (4, 84, 84) uint8 frames")
WRONG_OBSERVATIONS["ppo_procgen_impala.py"] = ("probe_envs:Probe1Atari-v0", "needs (64, 64, 3) uint8 images")
SCRIPT_BAD_INPUT = {
    "ppo.py": [
        CUDAGRAPHS_ON_CPU,
        (["--num-minibatches", "3"], "must divide the batch size"),
        (["--env-id", "Pendulum-v1", "--env-backend", "gymnasium"], "needs discrete actions"),
    ],
    "reinforce.py": [(["--batch-size", "0"], "--batch-size must be ≥ 1, got 0")],
    "reinforce_baseline.py": [(["--value-epochs", "0"], "--value-epochs must be ≥ 1, got 0")],
    "ppo_continuous.py": [
        CUDAGRAPHS_ON_CPU,
        (["--env-id", "CartPole-v1"], "needs Box (continuous) actions"),
    ],
    "ppo_objectives.py": [
        (["--env-id", "CartPole-v1"], "needs Box (continuous) actions")
    ],  # (its own: its tests)
    "ppo_atari.py": [
        CUDAGRAPHS_ON_CPU,
        (
            ["--env-id", "BreakotNoFrameskip-v4"],
            "unknown environment id 'BreakotNoFrameskip-v4'; did you mean BreakoutNoFrameskip-v4",
        ),
        (
            ["--env-id", "ALE/Breakot-v5"],
            "unknown environment id 'ALE/Breakot-v5'; did you mean ALE/Breakout-v5",
        ),
        (["--env-id", "Breakout-v5", "--env-backend", "gymnasium"], "is an Atari id: it runs on envpool"),
        (["--num-minibatches", "3"], "must divide the batch size"),
    ],
    "ppo_procgen_impala.py": [
        CUDAGRAPHS_ON_CPU,
        (
            ["--env-id", "procgen-bigfsh-v0"],
            "unknown environment id 'procgen-bigfsh-v0'; did you mean procgen-bigfish-v0",
        ),
        (["--env-id", "bigfsh"], "unknown environment id 'bigfsh'; did you mean bigfish"),
        (["--num-levels", "-1"], "--num-levels must be ≥ 0, got -1"),
        (["--num-minibatches", "3"], "must divide the batch size"),
    ],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_from_the_shell_is_one_line_nonzero_and_writes_nothing(tmp_path, script):
    """As a user meets it, in a process of its own (every other bad input: the test below, in this one)."""
    flags, message = BAD_INPUT[0]
    proc = run_cli(
        script, *CLI_FLAGS[script], *flags, "--run-dir", tmp_path / "runs", "--total-timesteps", "4096"
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert last_json(proc.stdout)["status"] == "usage error"  # a sweep's `| tail -1` still parses
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "script, flags, message",
    [
        (s, f, m)
        for s in SCRIPTS
        for f, m in BAD_INPUT
        + SCRIPT_BAD_INPUT[s]
        + [(["--env-id", WRONG_OBSERVATIONS[s][0]], WRONG_OBSERVATIONS[s][1])]
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, script, flags, message, cli_here):
    """In this process (cli_here): any exception but the usage error would fail the test, as a traceback
    would."""
    proc = cli_here(
        script, *CLI_FLAGS[script], *flags, "--run-dir", tmp_path / "runs", "--total-timesteps", 4096
    )
    assert proc.returncode == 1
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert last_json(proc.stdout)["status"] == "usage error"
    assert not (tmp_path / "runs").exists()


def small_run(script, run_dir, **overrides):
    """A small run of `script` in this process, with its checkpoint; returns (module, summary)."""
    module = load_script(script)
    return module, module.main(small_args(script, run_dir, save_model=True, save_interval=1, **overrides))


def load_ckpt(path):
    return torch.load(path, weights_only=True)  # what the scripts do: a checkpoint is data


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_continues_the_run(script, run_dir):
    module, first = small_run(script, run_dir)
    ckpt_path = os.path.join(first["run_dir"], "checkpoint.pt")
    before = load_ckpt(ckpt_path)
    # (REINFORCE's batches end with whole episodes, so its first run may already have passed 512 steps)
    budget = max(512, 2 * first["global_step"])
    args = module.parse_args(["--resume", ckpt_path, "--total-timesteps", str(budget), "--no-save-model"])
    assert (args.num_envs, args.save_model, args.seed) == (SMALL[script]["num_envs"], False, 1)  # stored args
    second = module.main(args)
    assert second["run_dir"] == first["run_dir"] and second["global_step"] >= budget
    # counters go on (HalfCheetah's 1000-step episodes may not end in these runs); even without
    # --save-model the checkpoint ends where the resumed run ended
    after = load_ckpt(ckpt_path)
    assert second["episodes"] >= first["episodes"] and after["episodes"][""] == second["episodes"]
    assert after["iteration"] > before["iteration"] and after["global_step"] == second["global_step"]
    # Adam's step counts continued from the checkpoint rather than restarting
    steps = sorted({s["step"].item() for s in after["optimizer"]["state"].values()})
    updates = after["iteration"] - (script in MEASURE_FIRST)  # their first iteration only measures
    assert steps == [k * updates for k in STEPS_PER_ITERATION[script]]
    tb_steps = [s for s, _ in read_scalars(first["run_dir"])["charts/SPS"]]
    assert max(tb_steps) == second["global_step"] and len(tb_steps) == after["iteration"]
    # the first run's arguments stay on record; the resume's are added, named by the step it resumed at
    assert json.load(open(os.path.join(first["run_dir"], "args.json")))["total_timesteps"] == 256
    resumed = json.load(open(os.path.join(first["run_dir"], f"args-{first['global_step']}.json")))
    assert resumed["total_timesteps"] == budget and resumed["resume"] == ckpt_path


@pytest.mark.parametrize("script", SCRIPTS)
def test_eval_checkpoint_evaluates_without_training(script, run_dir):
    module, first = small_run(script, run_dir, env_id=QUICK_ENV[script], env_backend="gymnasium")
    runs_before = os.listdir(run_dir)
    ckpt_path = os.path.join(first["run_dir"], "checkpoint.pt")
    summary = module.main(module.parse_args(["--eval-checkpoint", ckpt_path, "--eval-episodes", "2"]))
    assert summary["eval_episodes"] == 2 and summary["global_step"] == first["global_step"]
    assert summary["status"] == "finished" and math.isfinite(summary["eval_return_mean"])
    assert os.listdir(run_dir) == runs_before  # no new run directory
    assert load_ckpt(ckpt_path)["global_step"] == first["global_step"]


def test_resume_from_another_scripts_checkpoint_is_a_clear_error(run_dir, cli_here):
    summary = load_script("reinforce.py").main(small_args("reinforce.py", run_dir, save_model=True))
    proc = cli_here("ppo.py", "--resume", os.path.join(summary["run_dir"], "checkpoint.pt"))
    assert proc.returncode == 1 and "is not a complete checkpoint of ppo.py (of this version)" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# The stop flag is read by the harness's run.iterations() and the checkpoint written by the harness (the same
# bytes in every script; what each script puts in its checkpoint: the resume test above, for every script):
# one script per kind of training loop, in a process of its own as a scheduler would signal it.
SIGNAL_SCRIPTS = ["reinforce.py", "ppo.py", "ppo_continuous.py"]


@pytest.mark.parametrize("script", SIGNAL_SCRIPTS)
def test_sigterm_saves_checkpoint_and_summary(script, run_dir):
    """SIGTERM (what Slurm and Kubernetes send) does what Ctrl-C does: finish the iteration, checkpoint,
    summary, JSON line; exit 143 (128 + 15, as a shell reports it). Ctrl-C itself: test_harness.py."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), *CLI_FLAGS[script], "--total-timesteps", "50000000"]
        + ["--run-dir", run_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    wait_for_an_iteration(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    summary = last_json(out)
    assert (
        summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["global_step"] > 0
    )
    assert json.load(open(os.path.join(summary["run_dir"], "summary.json"))) == summary
    ckpt = load_ckpt(os.path.join(summary["run_dir"], "checkpoint.pt"))
    assert ckpt["global_step"] == summary["global_step"]
    assert "charts/SPS" in read_scalars(summary["run_dir"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(script, run_dir):
    # The NaN variant of the counting env gives NaN rewards once an env has taken 300 steps
    module = load_script(script)
    args = small_args(
        script,
        run_dir,
        env_id=COUNTING[script].format("NaN"),
        total_timesteps=5000,
        save_model=True,
        save_interval=1,
    )
    summary = module.main(args)
    assert summary["status"] == "non-finite loss"
    failed_at = int(summary["error"].split("non-finite loss at iteration ")[1])
    ckpt = load_ckpt(os.path.join(summary["run_dir"], "checkpoint.pt"))
    assert ckpt["iteration"] == failed_at - 1
    weights = [v for v in ckpt["agent"].values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert weights and all(torch.isfinite(v).all() for v in weights)
    assert json.load(open(os.path.join(summary["run_dir"], "summary.json"))) == summary


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_same_summary(script, run_dir):
    module = load_script(script)
    timing = ("sps", "wall_seconds", "run_dir")
    a, b = (module.main(small_args(script, run_dir, total_timesteps=1024, seed=7)) for _ in range(2))
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


@pytest.mark.parametrize("script", SCRIPTS)
def test_gymnasium_backend_and_eval(script, run_dir):
    module = load_script(script)
    args = small_args(script, run_dir, env_id=QUICK_ENV[script], env_backend="gymnasium", eval_episodes=2)
    summary = module.main(args)
    assert summary["backend"] == "gymnasium" and summary["eval_return_mean"] > 0
    assert len(read_scalars(summary["run_dir"])["eval/episodic_return"]) == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_capture_video(script, run_dir, monkeypatch):
    pytest.importorskip("moviepy", reason="--capture-video needs moviepy (the [video] extra)")
    env_id = VIDEO_ENV[script]
    if script in MEASURE_FIRST:  # MuJoCo needs an off-screen OpenGL (EGL here)
        monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
        try:
            env = gym.make(env_id, render_mode="rgb_array")
            env.reset(seed=0)
            env.render()
        except Exception as e:
            pytest.skip(f"MuJoCo cannot render off-screen on this machine ({type(e).__name__}: {e})")
    summary = load_script(script).main(small_args(script, run_dir, env_id=env_id, capture_video=True))
    videos = os.listdir(os.path.join(summary["run_dir"], "videos"))
    assert any(v.endswith(".mp4") for v in videos)


def test_track_with_wandb_offline(run_dir, monkeypatch):
    """W&B once, on ppo.py: the harness that does it is the same bytes in every script."""
    pytest.importorskip("wandb", reason="--track needs wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = load_script("ppo.py").main(small_args("ppo.py", run_dir, track=True))
    assert os.path.isdir(os.path.join(summary["run_dir"], "wandb"))


FENCE = "# ============================================ RUN HARNESS ============================================\n"


def harness_of(script):
    source = open(os.path.join(ROOT, script)).read()
    assert source.count(FENCE) == 1, f"{script}: the fence line must appear exactly once"
    return source[source.index(FENCE) :]


# the multi-GPU script's one-process behaviour is ppo_atari.py's (tests/test_ppo_atari_multigpu.py)
ALL_SCRIPTS = SCRIPTS + ["ppo_atari_multigpu.py"]


@pytest.mark.parametrize("script", [s for s in ALL_SCRIPTS if s != "ppo.py"])
def test_harness_is_byte_identical(script):
    """Everything below the fence is the same bytes in every script: a change there is made everywhere."""
    assert harness_of(script) == harness_of("ppo.py")


PPO_SHARED = ["compute_gae", "masked_mean", "normalize_advantages", "explained_variance", "ppo_loss"]
PPO_SHARED += ["flatten_parameters"]


@pytest.mark.parametrize("script", [s for s in ALL_SCRIPTS if s != "ppo.py"])
def test_shared_blocks_are_word_for_word_copies_of_ppo(script):
    """The scripts share no code, so the blocks they have in common above the fence must not drift apart
    (every PPO script carries the same compute_gae, word for word)."""
    ppo, module = load_script("ppo.py"), load_script(script)
    # make_env of the image scripts builds their own environments (Atari through envpool, Procgen)
    images = ("ppo_atari.py", "ppo_atari_multigpu.py", "ppo_procgen_impala.py")
    shared = ["layer_init"] + ([] if script in images else ["make_env"])
    for name in shared + (PPO_SHARED if script.startswith("ppo") else []):
        assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(ppo, name)), name


# Every thread of a process and the cores it may run on, as the process itself sees them (proc(5)).
THREAD_CORES = """
import json, os
def thread_cores():
    cores = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
        cores[tid] = line.split()[1]
    return cores
"""


# One script per kind of environment threads that its default starts: envpool's (ppo.py; reinforce.py,
# reinforce_baseline.py, ppo_continuous.py and ppo_objectives.py have its make_env word for word, test above,
# and envpool MuJoCo ids start the same worker threads), envpool Atari's, procgen's; the pinning is the
# harness's, the same bytes everywhere.
PIN_SCRIPTS = ["ppo.py", "ppo_atari.py", "ppo_procgen_impala.py"]


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/stat"), reason="CPU affinity is Linux-only")
@pytest.mark.parametrize("script", PIN_SCRIPTS)
def test_pinning_holds_every_later_thread(script):
    """--pin-cpu puts the calling thread on the core it is running on, and every thread started after it
    (envpool's workers, torch's) inherits that core; without it the workers may use every core."""
    code = (
        THREAD_CORES
        + f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
import {script[:-3]} as module
allowed = sorted(os.sched_getaffinity(0))
before = thread_cores()  # threads of the imports (numpy's BLAS pool): started before, left as they are
defaults = module.Args(total_timesteps=10**6, torch_threads=1, pin_cpu=sys.argv[1] == "pin", cuda=False)
core = module.Run(defaults).cpu_core
envs = module.make_env(defaults.env_id, defaults.num_envs, 1)
envs.reset()
torch.set_num_threads(2)
torch.randn(256, 256) @ torch.randn(256, 256)
later = {{tid: cores for tid, cores in thread_cores().items() if tid not in before}}
main = thread_cores()[str(os.getpid())]
print(json.dumps({{"allowed": allowed, "core": core, "later": later, "main": main}}))
"""
    )
    for mode in ("pin", "no-pin"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        result = last_json(proc.stdout)
        if script != "ppo_procgen_impala.py":  # envpool steps in worker threads, procgen in the calling one
            assert result["later"], result
        if mode == "pin":
            assert result["core"] in result["allowed"]
            assert result["main"] == str(result["core"]), result
            assert set(result["later"].values()) <= {str(result["core"])}, result
        elif len(result["allowed"]) > 1:  # the control: unpinned, every thread may run on several cores
            several = lambda cores: "-" in cores or "," in cores  # noqa: E731  ("0-1", "0,2")
            assert several(result["main"]) and all(map(several, result["later"].values())), result


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/stat"), reason="CPU affinity is Linux-only")
def test_pin_cpu_keeps_the_core_it_was_given(run_dir):
    """Under `taskset -c K` (each run of a parallel sweep on its own core), --pin-cpu stays on core K, and the
    summary says which core it ran on; --no-pin-cpu says none."""
    core = max(os.sched_getaffinity(0))
    flags = ["--total-timesteps", "1024", "--run-dir", run_dir, "--no-progress"]
    for pin, expected in (("--pin-cpu", core), ("--no-pin-cpu", None)):
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "ppo.py"), *flags, pin],
            capture_output=True,
            text=True,
            cwd=ROOT,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        )
        assert proc.returncode == 0, proc.stderr
        assert last_json(proc.stdout)["cpu_core"] == expected
