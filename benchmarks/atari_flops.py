"""The Atari update's FLOP rate, this project's and CleanRL's, against the machine's peak for the same shapes.

    python benchmarks/atari_flops.py [--venv DIR]   # about 2 min; writes benchmarks/atari_flops.json

vs_cleanrl.py's Breakout workload spends about 80% of either side's loop in the update (profile_breakdown.py),
whose cost is the Nature CNN's forward and backward on minibatches of 256 frames (8 envs x 128 steps / 4).
This script times one minibatch step (forward, PPO loss, backward, gradient clip, Adam) of each side on one
core with one torch thread, alternating A B A B, and counts its floating-point operations from the layers'
shapes: a convolution or linear layer is 2 x MACs forward, as much again for the gradient of its weights,
and as much again for the gradient of its input (not for the first layer, whose input is the frames).

- ours: ppo_atari.py's Agent and ppo_loss, as its update calls them (channels-last memory, one flat
  parameter tensor, fused Adam);
- CleanRL: the `layer_init` and `Agent` of CleanRL 1.2.0's ppo_atari_envpool.py, read from the installed
  package (vs_cleanrl.py's venv; never copied here) and run in this process's torch, with the loss of that
  file's update written out below (the same formula) and its Adam (torch's default implementation);
- peak: every layer's forward and backward timed alone at these shapes, each in the faster of two ways:
  the GEMMs of im2col (torch.mm: forward, the weight gradient, the input gradient) or oneDNN's convolution
  (channels-last; the 3136 -> 512 layer as the 7x7 convolution it equals). On this VM's AMD EPYC torch's
  BLAS (MKL) runs an SGEMM at about 110 GFLOP/s where oneDNN's convolutions reach about 200, so the GEMMs
  alone are reported too; and one large square SGEMM, what the BLAS does at its best.

The ratio of peak to CleanRL's rate bounds what an implementation of this update built on these kernels
could gain over CleanRL's on this machine.
"""

import argparse
import ast
import functools
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from common import ROOT, pin_to_current_core
from torch import nn
from torch.distributions.categorical import Categorical
from vs_cleanrl import CLEANRL, ensure_venv

import ppo_atari  # (importable through the path entry that common adds)

MINIBATCH, ACTIONS = 256, 4  # ppo_atari.py's defaults; Breakout's 4 actions


def cleanrl_agent_class(python):
    """CleanRL's own layer_init and Agent, read from its installed ppo_atari_envpool.py (nothing else)."""
    import subprocess

    path = subprocess.run(
        [
            python,
            "-c",
            "import cleanrl, os; print(os.path.join(cleanrl.__path__[0], 'ppo_atari_envpool.py'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = ast.parse(open(path).read())
    keep = [
        n
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in ("layer_init", "Agent")
    ]
    namespace = {"nn": nn, "torch": torch, "np": np, "Categorical": Categorical}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    return namespace["Agent"], path


def layer_flops(model, x):
    """(forward, backward) FLOPs of a minibatch in the conv and linear layers (not the elementwise work)."""
    forward, backward, first = [], [], []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = output.numel() * module.in_channels * kh * kw
        else:
            macs = output.numel() * module.in_features
        forward.append(2 * macs)
        backward.append(2 * macs * (1 if not first else 2))  # the first layer needs no input gradient
        first.append(module)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.get_action_and_value(x)
    for h in handles:
        h.remove()
    return sum(forward), sum(backward)


def peak_layers(batch):
    """Seconds of an ideal Nature CNN step at these shapes: each layer's forward and its backward (the weight
    gradient, and the input gradient but in the first layer) timed alone, in the faster of two ways: as the
    GEMMs of im2col (torch.mm, torch's BLAS) and as oneDNN's convolutions (channels-last, what torch runs for
    Conv2d on a CPU). Returns (seconds, seconds with GEMMs only)."""
    # (in channels, input size, out channels, kernel, stride) of conv1..3 and of the 3136 -> 512 layer (a 7x7
    # convolution over the 7x7 map); then the two heads, which are GEMMs either way
    convs = [(4, 84, 32, 8, 4), (32, 20, 64, 4, 2), (64, 9, 64, 3, 1), (64, 7, 512, 7, 1)]
    total = gemms_only = 0.0
    for i, (cin, size, cout, k, stride) in enumerate(convs):
        out, first = (size - k) // stride + 1, i == 0
        rows, inner = batch * out * out, cin * k * k  # im2col: (rows, inner) x (inner, cout)
        a, w, g = torch.randn(rows, inner), torch.randn(inner, cout), torch.randn(rows, cout)
        gemm = (
            best_of(functools.partial(torch.mm, a, w), 5, 3),
            best_of(functools.partial(torch.mm, a.t(), g), 5, 3),
        )
        gemm += () if first else (best_of(functools.partial(torch.mm, g, w.t()), 5, 3),)  # forward, dW, dX
        cl = torch.channels_last
        x = torch.randn(batch, cin, size, size).contiguous(memory_format=cl)
        weight = torch.randn(cout, cin, k, k).contiguous(memory_format=cl)
        grad = torch.randn(batch, cout, out, out).contiguous(memory_format=cl)
        forward = functools.partial(torch.nn.functional.conv2d, x, weight, None, stride)
        backward = functools.partial(
            torch.ops.aten.convolution_backward, grad, x, weight, None,
            (stride, stride), (0, 0), (1, 1), False, (0, 0), 1, (not first, True, False),
        )  # fmt: skip
        conv = best_of(forward, 5, 3), best_of(backward, 5, 3)
        total += min(gemm[0], conv[0]) + min(sum(gemm[1:]), conv[1])
        gemms_only += sum(gemm)
    for n in (ACTIONS, 1):
        a, w, g = torch.randn(batch, 512), torch.randn(512, n), torch.randn(batch, n)
        heads = sum(
            best_of(functools.partial(torch.mm, x, y), 5, 3) for x, y in ((a, w), (a.t(), g), (g, w.t()))
        )
        total, gemms_only = total + heads, gemms_only + heads
    return total, gemms_only


def best_of(f, reps, warmup):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--venv", default=os.path.join("/tmp", f"cleanrl-{CLEANRL}-venv"), help="CleanRL's venv"
    )
    parser.add_argument("--pairs", type=int, default=5, help="A B pairs of timed minibatch steps")
    parser.add_argument("--steps", type=int, default=20, help="minibatch steps per timed run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    core = pin_to_current_core()
    CleanAgent, cleanrl_path = cleanrl_agent_class(ensure_venv(args.venv))

    import gymnasium as gym

    obs_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    torch.manual_seed(1)
    frames = torch.randint(0, 256, (MINIBATCH, 4, 84, 84), dtype=torch.uint8)
    actions = torch.randint(0, ACTIONS, (MINIBATCH,))
    old_logprob, adv = torch.full((MINIBATCH,), -np.log(ACTIONS)), torch.randn(MINIBATCH)
    old_value, ret, valid = torch.randn(MINIBATCH), torch.randn(MINIBATCH), torch.ones(MINIBATCH)
    pa = ppo_atari.Args()

    ours = ppo_atari.Agent(obs_space, gym.spaces.Discrete(ACTIONS))
    flat = ppo_atari.flatten_parameters(ours)  # as ppo_atari.py's update: one tensor, fused Adam, one clip
    ours_opt = torch.optim.Adam([flat], lr=pa.learning_rate, eps=1e-5, fused=True)

    def ours_step():
        _, newlogprob, entropy, newvalue = ours.get_action_and_value(frames, actions)
        loss, _ = ppo_atari.ppo_loss(
            newlogprob, old_logprob, adv, newvalue, old_value, ret, entropy, valid, pa
        )
        flat.grad.zero_()
        loss.backward()
        nn.utils.clip_grad_norm_(flat, pa.max_grad_norm)
        ours_opt.step()

    envs = type("Envs", (), {"single_action_space": gym.spaces.Discrete(ACTIONS)})()
    theirs = CleanAgent(envs)
    theirs_opt = torch.optim.Adam(theirs.parameters(), lr=pa.learning_rate, eps=1e-5)
    frames_float = frames.float()  # CleanRL's buffer holds float32 frames

    def cleanrl_step():  # the loss of ppo_atari_envpool.py's update, as written there
        _, newlogprob, entropy, newvalue = theirs.get_action_and_value(frames_float, actions)
        logratio = newlogprob - old_logprob
        ratio = logratio.exp()
        with torch.no_grad():
            ((ratio - 1) - logratio).mean()
            ((ratio - 1.0).abs() > pa.clip_coef).float().mean().item()
        mb_adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg_loss = torch.max(
            -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - pa.clip_coef, 1 + pa.clip_coef)
        ).mean()
        newvalue = newvalue.view(-1)
        v_clipped = old_value + torch.clamp(newvalue - old_value, -pa.clip_coef, pa.clip_coef)
        v_loss = 0.5 * torch.max((newvalue - ret) ** 2, (v_clipped - ret) ** 2).mean()
        loss = pg_loss - pa.ent_coef * entropy.mean() + v_loss * pa.vf_coef
        theirs_opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(theirs.parameters(), pa.max_grad_norm)
        theirs_opt.step()

    fwd, bwd = layer_flops(ours, frames)
    assert (fwd, bwd) == layer_flops(theirs, frames_float), "the two networks differ"
    flops = fwd + bwd
    times = {"ours": [], "cleanrl": []}
    for f in (ours_step, cleanrl_step):
        for _ in range(3):
            f()  # warm-up: allocations, MKL-DNN primitives
    for _ in range(args.pairs):
        for name, f in (("ours", ours_step), ("cleanrl", cleanrl_step)):
            start = time.perf_counter()
            for _ in range(args.steps):
                f()
            times[name].append((time.perf_counter() - start) / args.steps)
    ideal, gemms_only = peak_layers(MINIBATCH)
    big = torch.randn(2048, 2048)
    sgemm = 2 * 2048**3 / best_of(lambda: big @ big, 5, 2)

    seconds = {k: float(np.median(v)) for k, v in times.items()}
    rate = {k: flops / s for k, s in seconds.items()}
    result = {
        "command": "python benchmarks/atari_flops.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "torch": torch.__version__,
        "cleanrl_source": os.path.relpath(cleanrl_path, args.venv),
        "core": core,
        "minibatch": MINIBATCH,
        "gflop_per_minibatch_step": round(flops / 1e9, 3),
        "ms_per_minibatch_step": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
        "median_ms": {k: round(s * 1e3, 1) for k, s in seconds.items()},
        "gflops": {k: round(r / 1e9, 1) for k, r in rate.items()},
        "peak_same_shapes_gflops": round(flops / ideal / 1e9, 1),
        "peak_ms_same_shapes": round(ideal * 1e3, 1),
        "gemms_only_same_shapes_gflops": round(flops / gemms_only / 1e9, 1),
        "sgemm_2048_gflops": round(sgemm / 1e9, 1),
        "ours_over_cleanrl": round(seconds["cleanrl"] / seconds["ours"], 2),
        "peak_over_cleanrl": round(seconds["cleanrl"] / ideal, 2),
    }
    print(json.dumps(result, indent=1))
    with open(os.path.join(ROOT, "benchmarks", "atari_flops.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
