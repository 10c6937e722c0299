"""One command for a machine with NVIDIA GPUs: every path that only CUDA can show, in one report.

    python benchmarks/gpu_check.py                  # everything; writes benchmarks/gpu_report.{md,json}
    python benchmarks/gpu_check.py --skip-tests     # only the speed and scaling numbers

1. The whole test suite, on CUDA: the scripts choose CUDA when it is there (`--cuda` is on by default), so
   every test that trains (resume, --compile, --cudagraphs, evaluation, uint8 storage) trains on the GPU.
2. `benchmarks/speed.py --cuda --compile --cudagraphs` on the PPO scripts: training SPS, eager and compiled.
3. `ppo_atari_multigpu.py` under torchrun on 1, 2, 4, ... GPUs (up to every GPU present), `--envs-per-gpu`
   environments per GPU (weak scaling): SPS and the efficiency SPS(n) / (n x SPS(1)).
On a machine without CUDA it says what it skipped and exits 0 (CI runs the suite on the CPU).
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

from common import ROOT


def run(cmd, env=None, timeout=None):
    """(exit code, stdout, stderr, seconds) of a command run from the repository's root."""
    start = time.time()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout
    )
    return proc.returncode, proc.stdout, proc.stderr, round(time.time() - start, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--envs-per-gpu", type=int, default=8)
    parser.add_argument(
        "--scaling-steps", type=int, default=200_000, help="steps per GPU of each scaling run"
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "gpu_report"))
    args = parser.parse_args()
    import torch

    report = {
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "skipped": [],
    }
    if not torch.cuda.is_available():
        report["skipped"] = [
            "the test suite on CUDA (no CUDA here: `python -m pytest -n 2` runs it on the CPU, as CI does)",
            "benchmarks/speed.py --cuda --compile --cudagraphs",
            "ppo_atari_multigpu.py on GPUs (tests/test_ppo_atari_multigpu.py runs two CPU ranks with gloo)",
        ]
        print("no CUDA device: skipped\n  - " + "\n  - ".join(report["skipped"]))
        return 0
    lines = [
        f"# GPU report\n\n`{report['command']}` on {report['machine']}, GPUs: {', '.join(report['gpus'])}\n"
    ]

    if args.skip_tests:
        report["skipped"].append("the test suite (--skip-tests)")
    else:
        code, out, err, seconds = run(
            [sys.executable, "-m", "pytest", "-q", "-n", "4", "-p", "no:cacheprovider"]
        )
        last = (out.strip().splitlines() or ["(no output)"])[-1]
        report["tests"] = {"exit_code": code, "result": last, "seconds": seconds}
        failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
        report["tests"]["failures"] = failed
        lines.append(f"## Tests on CUDA\n\n{last} ({seconds} s, exit code {code})\n")
        lines += [f"- {line}" for line in failed] + [""]

    speed_json = args.out + "_speed.json"
    scripts = ["ppo.py", "ppo_continuous.py", "ppo_atari.py", "ppo_procgen_impala.py"]
    speed_cmd = [sys.executable, "benchmarks/speed.py", "--cuda", "--compile", "--cudagraphs", "--scripts"]
    code, out, err, seconds = run([*speed_cmd, *scripts, "--out", speed_json])
    report["speed"] = {"exit_code": code, "seconds": seconds}
    lines.append("## Training speed on one GPU (benchmarks/speed.py --cuda --compile --cudagraphs)\n")
    if code == 0:
        rows = json.load(open(speed_json))["rows"]
        report["speed"]["rows"] = rows
        lines += ["| script | env | options | training SPS | steady SPS |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['script']} | {r['env']} | {r['options']} | {r['training_sps']:,} | {r['steady_sps'] or '-'} |"
            for r in rows
        ]
    else:
        lines.append(f"failed (exit {code}): {err.strip().splitlines()[-1:]}")
    lines.append("")

    gpus = torch.cuda.device_count()
    counts = sorted({n for n in (1, 2, 4, 8, 16) if n <= gpus} | {gpus})  # up to every GPU present
    scaling = []
    for n in counts:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        cmd += ["ppo_atari_multigpu.py", "--env-id", "BreakoutNoFrameskip-v4", "--no-progress"]
        cmd += ["--num-envs", str(args.envs_per_gpu * n), "--total-timesteps", str(args.scaling_steps * n)]
        cmd += ["--run-dir", os.path.join(ROOT, "runs", "gpu_check")]
        code, out, err, seconds = run(cmd, env={"OMP_NUM_THREADS": "1"})
        summary = json.loads(out.strip().splitlines()[-1]) if code == 0 and out.strip() else {}
        scaling.append({"gpus": n, "exit_code": code, "sps": summary.get("sps"), "seconds": seconds})
        if code != 0:
            scaling[-1]["error"] = [
                line for line in err.splitlines() if re.match(r"(\[rank\d+\]: )?error:", line)
            ][:2]
    report["scaling"] = scaling
    base = scaling[0]["sps"] if scaling and scaling[0]["sps"] else None
    lines += ["## ppo_atari_multigpu.py, Breakout, weak scaling", ""]
    lines += [f"{args.envs_per_gpu} envs and {args.scaling_steps:,} steps per GPU.", ""]
    lines += ["| GPUs | SPS | efficiency |", "|---|---|---|"]
    for row in scaling:
        eff = f"{row['sps'] / (row['gpus'] * base):.2f}" if base and row["sps"] else "-"
        lines.append(f"| {row['gpus']} | {row['sps'] or 'failed: ' + str(row.get('error'))} | {eff} |")

    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return (
        0
        if report.get("tests", {}).get("exit_code", 0) == 0 and all(r["exit_code"] == 0 for r in scaling)
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
