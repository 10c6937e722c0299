#!/usr/bin/env bash
# CleanRL's own ppo_continuous_action.py on the same machine, installed as a package in a venv of its own
# (never copied into this repository), for comparison with `python benchmarks/mujoco.py`.
#
#   bash benchmarks/cleanrl_mujoco.sh [ENV_ID] [SEED ...]      # default: Hopper-v4, seeds 1 2
#   COLLECT_ONLY=1 bash benchmarks/cleanrl_mujoco.sh ...        # train nothing: read runs/cleanrl_mujoco
#   TOTAL_TIMESTEPS=4096 bash benchmarks/cleanrl_mujoco.sh ...  # a short check (prints, writes no JSON)
#
# cleanrl 1.2.0 (the last release on PyPI) declares Python < 3.11, and its full dependency list pins
# pygame 2.1.0 and stable-baselines3 1.2.0, which do not install on Python 3.11: the wheel goes in with
# --no-deps --ignore-requires-python, beside what ppo_continuous_action.py imports (gymnasium 0.28.1 as
# cleanrl asks, mujoco 2.3.3, tensorboard, imageio for gymnasium's MuJoCo module). Seeds run two at a
# time, one per core, one torch thread each. Results: benchmarks/cleanrl_mujoco.json, read from the TensorBoard
# logs by the `python` on PATH: run it with this repository's venv active.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_ID=${1:-Hopper-v4}
shift || true
SEEDS=${*:-1 2}
VENV=${CLEANRL_VENV:-/tmp/cleanrl-venv}
TOTAL=${TOTAL_TIMESTEPS:-1000000}
OUT=runs/cleanrl_mujoco
[ "$TOTAL" = 1000000 ] || OUT=runs/cleanrl_mujoco_check

if [ -z "${COLLECT_ONLY:-}" ] && [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" download -q cleanrl==1.2.0 --no-deps --ignore-requires-python -d "$VENV/wheels"
    "$VENV/bin/pip" install -q --no-deps --ignore-requires-python "$VENV"/wheels/cleanrl-1.2.0-*.whl
    "$VENV/bin/pip" install -q "gymnasium==0.28.1" "mujoco==2.3.3" tensorboard "numpy<2" "imageio<3"
fi
mkdir -p "$OUT"
core=0
for seed in $([ -z "${COLLECT_ONLY:-}" ] && echo $SEEDS); do
    (cd "$OUT" && OMP_NUM_THREADS=1 taskset -c $core "$VENV/bin/python" -m cleanrl.ppo_continuous_action \
        --env-id "$ENV_ID" --seed "$seed" --total-timesteps "$TOTAL" --cuda False > "seed$seed.log" 2>&1) &
    core=$(( (core + 1) % 2 ))
    if [ "$core" -eq 0 ]; then wait; fi
done
wait
python - "$ENV_ID" "$OUT" "$TOTAL" $SEEDS <<'PY'
import glob, json, os, platform, sys
sys.path.insert(0, ".")
from tests.conftest import read_scalars
env_id, out, total, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
runs = {}
for d in sorted(glob.glob(os.path.join(out, "runs", f"{env_id}__ppo_continuous_action__*"))):
    if d.split("__")[2] not in seeds:
        continue
    s = read_scalars(d)
    returns = [v for _, v in s["charts/episodic_return"]]
    runs[int(d.split("__")[2])] = {"episodes": len(returns), "mean_last100": sum(returns[-100:]) / len(returns[-100:])}
result = {"command": "bash benchmarks/cleanrl_mujoco.sh " + " ".join([env_id, *seeds]), "cleanrl": "1.2.0",
          "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
          "env_id": env_id, "per_seed": runs}
if total == 1000000:
    json.dump(result, open("benchmarks/cleanrl_mujoco.json", "w"), indent=1)
print(json.dumps(result, indent=1))
PY
