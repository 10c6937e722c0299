"""What limits data-parallel PPO (ppo_atari_multigpu.py), measured on this machine: the pieces of one
iteration at the default Atari sizes, and what each costs.

    python benchmarks/scaling.py          # writes benchmarks/scaling.json (about a minute)

- env: envpool Breakout stepped with random actions on one core (8 envs): the steps one core supplies;
- update: one minibatch (256 frames) forward, backward and Adam step of the Nature CNN on this device;
- all-reduce: the gradient of the Nature CNN (one flat float32 buffer) averaged across 2 local processes
  (gloo on CPU, NCCL with --cuda), which data parallelism adds to every minibatch;
- gather: the per-iteration all_gather_object of episode statistics and the all-reduces of the logged
  statistics and of the stop flag, which the harness adds to every iteration.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from common import ROOT, pin_to_current_core

sys.path.insert(0, ROOT)


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def distributed_part(rank, world, port, device, numel, out):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)  # before the group: NCCL stages all_gather_object on the current device
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    flat = torch.randn(numel, device=dev)

    def all_reduce():
        dist.all_reduce(flat)
        if device == "cuda":
            torch.cuda.synchronize()

    def per_iteration():
        gathered = [None] * world
        dist.all_gather_object(gathered, ([float(i) for i in range(8)], list(range(8))))
        stats = torch.zeros(12, dtype=torch.float64, device=dev)
        dist.all_reduce(stats)
        flag = torch.zeros((), device=dev)
        dist.all_reduce(flag)

    for _ in range(5):
        all_reduce()
        per_iteration()
    result = {
        "all_reduce_s": median_seconds(all_reduce, 50),
        "per_iteration_s": median_seconds(per_iteration, 50),
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "scaling.json"))
    args = parser.parse_args()
    import torch
    import torch.multiprocessing as mp

    import ppo_atari

    torch.set_num_threads(1)
    device = torch.device("cuda" if args.cuda else "cpu")
    core = pin_to_current_core()  # first: envpool's worker threads inherit the core
    envs = ppo_atari.make_env("BreakoutNoFrameskip-v4", 8, 1)
    rng = np.random.default_rng(1)
    envs.reset()

    def step_envs():
        for _ in range(100):
            envs.step(rng.integers(0, envs.single_action_space.n, 8))

    env_sps = 800 / median_seconds(step_envs, 10)
    envs.close()
    if core is not None:
        os.sched_setaffinity(0, set(range(os.cpu_count())))

    agent = ppo_atari.Agent(envs.single_observation_space, envs.single_action_space).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5)
    frames = torch.randint(0, 256, (256, 4, 84, 84), dtype=torch.uint8, device=device)
    actions = torch.randint(0, 4, (256,), device=device)

    def update():
        _, logprob, entropy, value = agent.get_action_and_value(frames, actions)
        loss = -(logprob.mean() + 0.01 * entropy.mean()) + value.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    update()
    update_s = median_seconds(update, 10)
    numel = sum(p.numel() for p in agent.parameters())

    tmp = args.out + ".part"
    port = 29500 + os.getpid() % 1000
    mp.spawn(distributed_part, args=(2, port, device.type, numel, tmp), nprocs=2, join=True)
    with open(tmp) as f:
        dist_times = json.load(f)
    os.remove(tmp)

    result = {
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {device.type}",
        "env_steps_per_second_one_core": int(env_sps),
        "parameters": numel,
        "gradient_megabytes": round(numel * 4 / 1e6, 2),
        "update_seconds_per_minibatch_256": round(update_s, 5),
        "all_reduce_seconds_2_ranks": round(dist_times["all_reduce_s"], 5),
        "per_iteration_collectives_seconds": round(dist_times["per_iteration_s"], 5),
    }
    result["all_reduce_over_update"] = round(result["all_reduce_seconds_2_ranks"] / update_s, 3)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
