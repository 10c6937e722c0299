"""Where a PPO iteration's time goes, here and in CleanRL: py-spy samples mapped to the training loop's parts.

    pip install py-spy                        # once (a sampling profiler; it runs beside the script)
    python benchmarks/profile_breakdown.py    # vs_cleanrl.py's three workloads, both sides (6 to 10 min here)

Each side runs once at the workload's defaults (vs_cleanrl.py's scripts, budgets and CleanRL venv), on one
core with one torch thread, under `py-spy record --rate 200` (py-spy itself samples from the other core).
Every sample of the main thread is charged to the statement of the training loop it was in (its frame of
train() here, of the script's module-level code in CleanRL), and each statement to a part found from the
loop's structure (ast), the same way on both sides:
    env step    the statement that calls envs.step (with CleanRL's gymnasium wrappers, which run inside it)
    acting      the rollout's statements that run the policy (get_action...)
    rollout     the rest of the rollout: storage, tensor conversion, episode accounting, normalisation here
    advantages  between the rollout and the epochs: values, GAE, flattening the batch
    update      the epochs of minibatch updates
    logging     the statements after the epochs and every writer / run.log call
    harness     the loop's own line and what comes before the rollout (checkpoints, signals, the lr)
Samples outside the loop (imports, set-up, exit) are reported apart. Times are milliseconds per 1,000
environment steps. Writes benchmarks/profile_breakdown.json.
"""

import argparse
import ast
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from common import ROOT
from vs_cleanrl import WORKLOADS, ensure_venv

PARTS = ["env step", "acting", "rollout", "advantages", "update", "logging", "harness"]
RATE = 200  # samples per second


def statements(node):
    """Every statement below `node`, compound ones included (a sample can sit on a `with` or `for` line)."""
    for child in ast.walk(node):
        if isinstance(child, ast.stmt) and child is not node:
            yield child


def line_parts(source):
    """{line number: part} for the lines of the training loop of a script's source."""
    tree = ast.parse(source)
    loop = next(  # the loop over iterations: the one whose body loops over the rollout's steps
        n for n in ast.walk(tree)
        if isinstance(n, ast.For)
        and any(isinstance(s, ast.For) and ast.unparse(s.target) == "step" for s in n.body)
    )  # fmt: skip
    parts = {loop.lineno: "harness"}
    phase = "harness"
    for stmt in loop.body:
        target = stmt.target.id if isinstance(stmt, ast.For) and isinstance(stmt.target, ast.Name) else None
        if target == "step":
            phase = "rollout"
        elif phase == "rollout":
            phase = "advantages"
        if target == "epoch":
            phase = "update"
        elif phase == "update":
            phase = "logging"
        for s in [stmt, *statements(stmt)]:
            text = ast.get_source_segment(source, s)
            part = phase
            if phase == "rollout" and "envs.step(" in text and not isinstance(s, ast.For):
                part = "env step"
            elif phase == "rollout" and "get_action" in text and not isinstance(s, ast.For):
                part = "acting"
            if ("writer." in text or "run.log" in text) and not isinstance(s, (ast.For, ast.If)):
                part = "logging"
            for line in range(s.lineno, s.end_lineno + 1):
                # the innermost statement wins: ast.walk visits parents before children
                parts[line] = part
    return parts


def profile(cmd, script_path, ours, workdir, env):
    raw = os.path.join(workdir, "profile.raw")
    spy = [shutil.which("py-spy") or "py-spy", "record", "--rate", str(RATE), "--format", "raw", "-o", raw]
    proc = subprocess.run(spy + ["--"] + cmd, cwd=workdir, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-800:]}")
    with open(script_path) as f:
        parts = line_parts(f.read())
    name, func = os.path.basename(script_path), "train" if ours else "<module>"
    counts = collections.Counter()
    with open(raw) as f:
        for row in f:
            stack, n = row.rsplit(" ", 1)
            frames = stack.split(";")
            if "Thread._bootstrap" in frames[0]:
                continue  # other threads (TensorBoard's writer, envpool's are not Python)
            part = "outside the loop"
            for frame in frames:  # the frame of the training loop: function (file:line)
                fn, _, loc = frame.rpartition(" (")
                file, _, line = loc.rstrip(")").rpartition(":")
                if fn == func and os.path.basename(file) == name and line.isdigit():
                    part = parts.get(int(line), "outside the loop")
            counts[part] += int(n)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "cleanrl-1.2.0-venv"))
    parser.add_argument("--core", type=int, default=os.cpu_count() - 1, help="the core both sides run on")
    parser.add_argument("--steps", type=float, default=1.0, help="fraction of vs_cleanrl.py's full budgets")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("profile_breakdown.py: py-spy is not installed (pip install py-spy)")
    python = ensure_venv(args.venv)
    site = subprocess.run(
        [python, "-c", "import cleanrl; print(list(cleanrl.__path__)[0])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.workloads:
            script, module, cleanrl_id, full, _ = WORKLOADS[name]
            steps = int(full * args.steps)
            taskset = ["taskset", "-c", str(args.core)]
            sides = {
                script: (
                    taskset + [sys.executable, os.path.join(ROOT, script), "--env-id", name]
                    + ["--total-timesteps", str(steps), "--torch-threads", "1", "--no-progress"]
                    + ["--run-dir", os.path.join(workdir, "runs")],
                    os.path.join(ROOT, script), True,
                ),
                "CleanRL " + module.split(".")[1] + ".py": (
                    taskset + [python, "-m", module, "--env-id", cleanrl_id, "--total-timesteps", str(steps)]
                    + ["--cuda", "False"],
                    os.path.join(site, module.split(".")[1] + ".py"), False,
                ),
            }  # fmt: skip
            results[name] = {"steps": steps}
            for side, (cmd, path, is_ours) in sides.items():
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                counts = profile(cmd, path, is_ours, workdir, env)
                ms = {p: round(1000 * counts[p] / RATE / steps * 1000, 1) for p in PARTS}
                ms["loop total"] = round(sum(ms[p] for p in PARTS), 1)
                ms["outside the loop (s)"] = round(counts["outside the loop"] / RATE, 1)
                results[name][side] = ms
                print(f"{name} {side}: " + ", ".join(f"{k} {v}" for k, v in ms.items()), flush=True)
    print(f"\nms per 1,000 environment steps (py-spy, {RATE} Hz, one core, one torch thread)")
    for name, r in results.items():
        sides = [k for k in r if k != "steps"]
        print(f"\n{name} ({r['steps']:,} steps){'':<6}" + "".join(f"{s:>34}" for s in sides))
        for p in PARTS + ["loop total", "outside the loop (s)"]:
            print(f"  {p:<28}" + "".join(f"{r[s][p]:>34}" for s in sides))
    result = {
        "command": "python benchmarks/profile_breakdown.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "rate_hz": RATE,
        "unit": "ms per 1,000 environment steps",
        "workloads": results,
    }
    with open(os.path.join(ROOT, "benchmarks", "profile_breakdown.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
