"""ppo_atari_multigpu.py's command line under torchrun, with hooks for the tests (set by environment
variables): RANK_OUT=DIR writes this rank's pid at the start, DIR/logged<rank> once it has logged an iteration,
and its weights at the end (DIR/pid<rank>, DIR/rank<rank>.pt); FIXED_ACTIONS=1 makes acting take action 0 (so that two runs see the same data);
FAIL_RANK=R makes rank R fail (a RunFailed, as a full disk would) at its second gradient all-reduce;
SIGNAL_RANK=R sends rank R a SIGINT the moment its second stop check's all-reduce returns (as if it had come
while the rank waited there: after its own "no" went in, before it reads the answer)."""

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_atari_multigpu as m  # noqa: E402
import tests.envs  # noqa: E402, F401  (registers the counting envs)
from tests.conftest import action_zero  # noqa: E402

out, rank = os.environ.get("RANK_OUT"), int(os.environ.get("RANK", 0))
if out:
    with open(os.path.join(out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    real_close = m.Run.close

    def close(self):
        if "agent" in getattr(self, "state", {}):
            torch.save(self.state["agent"].state_dict(), os.path.join(out, f"rank{self.rank}.pt"))
        real_close(self)

    m.Run.close = close
    real_log = m.Run.log

    def log(self, global_step, scalars):
        real_log(self, global_step, scalars)
        open(os.path.join(out, f"logged{self.rank}"), "w").close()

    m.Run.log = log

if os.environ.get("FIXED_ACTIONS"):
    m.Agent.get_action = action_zero

if os.environ.get("FAIL_RANK") == str(rank):
    real_average, calls = m.average_gradients, []

    def average_gradients(flat_params, world_size):
        calls.append(1)
        if len(calls) == 2:
            raise m.RunFailed("injected failure", "injected failure")
        real_average(flat_params, world_size)

    m.average_gradients = average_gradients

if os.environ.get("SIGNAL_RANK") == str(rank):
    real_collective, checks = m.collective, []

    def collective(call, *args, **kwargs):
        result = real_collective(call, *args, **kwargs)
        if kwargs.get("op") == m.dist.ReduceOp.MAX:  # stopping()'s all-reduce
            checks.append(1)
            if len(checks) == 2:
                signal.raise_signal(signal.SIGINT)  # its handler runs before this returns
        return result

    m.collective = collective

sys.exit(m.cli())
