#!/usr/bin/env python
"""One command that checks everything only a GPU can show, within a time budget (8 minutes on a lent H200).

    OUT=/results bash benchmarks/gpu_check.sh          # on the GPU machine: results under $OUT
    bash benchmarks/gpu_check.sh --dry-run --out DIR   # on a CPU: every step it can, with tiny sizes

Steps, most valuable first (each a subprocess with a time limit; a step that fails does not stop
the others; a step that would start past the budget is skipped and says so):

    install     pip install --no-deps --no-build-isolation -e .   (--dry-run: pip's own dry run)
    gpu         nvidia-smi: name, memory, driver
    info        python -m bnfused, which builds the C++/CUDA extension (BNFUSED_BUILD_CUDA=1) -> info.txt
    validate    the benchmark options below, parsed by the benchmarks' own parsers (typos fail here)
    tests       the whole test suite, GPU tests included, the GPU kernels' files first -> pytest.txt
    memcheck    compute-sanitizer --tool memcheck on the CUDA backend's forward/backward tests
    racecheck   compute-sanitizer --tool racecheck on the same tests
    kernels     bench_kernels.py on ResNet-50 shapes: float32 and bfloat16, NCHW and channels_last;
                torch, bnfused ("auto") and each bnfused backend -> kernels.csv, kernels.png (float32 NCHW)
    profile     profile_kernels.py: device time per kernel of torch's and the Triton backend's training
                forward and backward on ResNet-50's two shortest planes, NCHW, on the Triton plan's
                tile and two smaller ones (compiling each tile's kernels: ~40 s) -> profile.csv
    deferred    bench_deferred.py: CPU-side cost per call of a layer "auto" leaves to torch, against
                torch's modules -> deferred.txt
    models      bench_models.py: ResNet-50 and MobileNetV3-small, train and eval, both layouts, eager,
                torch vs bnfused -> models.csv (compiled models take minutes to compile: run
                bench_models.py with the compile providers in a call of their own)

Everything goes to OUT: gpu_check.log (every step's full output, written as it runs), info.txt,
pytest.txt, kernels.csv, kernels.png, profile.csv, deferred.txt, models.csv and summary.md: the table
printed last, one line per step with its status, time and what it found. The dry run replaces what needs a GPU: device
cpu, --quick timings, tiny shapes, no compile providers (compiling on a CPU takes minutes; their
names are still validated), the sanitizers' test selection without compute-sanitizer, and a few
tests instead of the suite. Standard library only: it must run before the package is installed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEFAULT_BUDGET_S = 470  # under 8 minutes, so that one 10-minute call leaves room for start-up and transfers
STEPS = (
    "install", "gpu", "info", "validate", "tests", "memcheck", "racecheck", "kernels", "profile", "deferred", "models"
)  # fmt: skip
SUMMARY_RESERVE_S = 10  # kept for merging files and printing the summary
# Seconds each step may take at most (the budget cuts them further). The first H200 run (2026-12-04)
# took: install 4, info 77 (the CUDA build), validate 12, the GPU-kernel tests 90 on 12 workers,
# memcheck 22, racecheck over 63, each kernel configuration 11-15 (no compile providers). Compiling
# three MobileNetV3-small training steps took over 100 s, so the kernel step times no compiled
# providers and the model step only eager ones.
LIMITS = {"install": 90, "gpu": 30, "info": 180, "validate": 60, "tests": 240, "memcheck": 60, "racecheck": 120,
          "kernels": 90, "plot": 60, "profile": 120, "deferred": 60, "models": 120}  # fmt: skip

KERNEL_PROVIDERS = "torch,torch+relu,bnfused,bnfused-triton,bnfused-cuda,bnfused+relu"
# Most telling first (float32 as written, bfloat16 channels_last as mixed-precision training runs): a
# configuration that would start past the budget is skipped.
KERNEL_CONFIGS = [
    ("float32", "nchw"),
    ("bfloat16", "channels_last"),
    ("float32", "channels_last"),
    ("bfloat16", "nchw"),
]
# Where the Triton kernels lose most (the first H200 run: a training step 2.2-3.5x torch's on 14x14 and
# 7x7 planes), kernel by kernel.
# 7x7 runs scalar loads at 116-192 registers on its default tile; the smaller tiles need half
# (benchmarks/triton_codegen.py).
PROFILE_ARGS = ["--shapes", "256x1024x14x14,256x2048x7x7", "--layout", "nchw", "--providers", "torch,bnfused-triton",
                "--blocks", "32x64,8x256", "--calls", "10"]  # fmt: skip
MODEL_PROVIDERS = "torch,bnfused"
MODEL_NAMES = ("resnet50", "mobilenet_v3_small")
MODEL_LAYOUTS = ("nchw", "channels_last")
# pytest-xdist's workers when it is installed (the GPU machine has it and 16 cores): the suite's
# CPU tests take 15 core-minutes.
XDIST = ["-n", "12"] if importlib.util.find_spec("xdist") is not None else []
# The whole suite, the files that exercise GPU kernels first (pytest drops the repeated paths), every
# test named with its outcome (-v) so that a run cut by its limit still says what passed. Not the dry
# run of this script: it runs on a CPU, as CI does.
TESTS = [
    "tests/test_triton.py", "tests/test_native.py", "tests", "-v", "-rfE", "--durations=15", *XDIST,
    "--deselect", "tests/test_gpu_check.py::test_dry_run_exercises_every_step_and_prints_the_summary_last",
]  # fmt: skip
# The CUDA backend's own tests, short enough for the sanitizers' slowdown.
# The plain layer's kernels, and the fused epilogue (every activation, with a residual) in float32 NCHW
# and channels_last: each kernel variant runs once under memcheck and racecheck.
SANITIZED_TESTS = [
    "tests/test_native.py", "tests/test_fused_cuda.py", "-k",
    "cuda and (forward_functions_match or backward_functions_match or "
    "(fused_layer_matches and float32 and train and residual))",
]  # fmt: skip

# Dry run (CPU): the same steps with what a CPU can do quickly.
DRY_KERNEL_PROVIDERS = "torch,torch+relu,bnfused,bnfused+relu"
DRY_MODEL_NAMES = ("lenet",)  # a ResNet-50 step takes seconds on a CPU; the real names are validated
DRY_TESTS = ["tests/test_benchmarks.py", "-q", "-k", "parse_shapes or provider_names or byte_model"]


@dataclass
class StepResult:
    name: str
    status: str  # ok, failed (rc N), timeout, skipped
    seconds: float
    found: str = ""


@dataclass
class Runner:
    """Runs steps as subprocesses against one deadline, logging their output to OUT/gpu_check.log."""

    out: Path
    deadline: float
    env: dict[str, str]
    results: list[StepResult] = field(default_factory=list)

    def __post_init__(self):
        self.log_path = self.out / "gpu_check.log"

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - SUMMARY_RESERVE_S

    def skip(self, name: str, why: str) -> None:
        print(f"== {name}: skipped ({why})", flush=True)
        self.results.append(StepResult(name, "skipped", 0.0, why))

    def run(self, name: str, command: Sequence[str], limit_s: float, copy_to: Path | None = None) -> str | None:
        """Runs ``command`` for at most ``limit_s`` (and never past the deadline); returns its output,
        or None when it was skipped. The output also goes to the log, and to ``copy_to`` if given."""
        timeout = min(limit_s, self.remaining())
        if timeout < 5:
            self.skip(name, "no time left in the budget")
            return None
        print(f"== {name}: {shlex.join(command)}  (limit {timeout:.0f} s)", flush=True)
        start = time.monotonic()
        lines: list[str] = []
        tail: deque[str] = deque(maxlen=8)
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {name}: {shlex.join(command)}\n")
            log.flush()
            # Its own process group: on timeout the whole tree goes (pytest's torchrun agents included).
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True, bufsize=1,
            )  # fmt: skip
            timer = _Killer(process, timeout)
            for line in process.stdout:
                log.write(line)
                log.flush()
                lines.append(line)
                tail.append(line.rstrip())
            process.wait()
            timer.cancel()
        seconds = time.monotonic() - start
        status = "ok" if process.returncode == 0 else f"failed (rc {process.returncode})"
        status = "timeout" if timer.fired else status
        for line in tail:
            print(f"   | {line}", flush=True)
        print(f"   {status}, {seconds:.0f} s", flush=True)
        output = "".join(lines)
        if copy_to is not None:
            copy_to.write_text(output)
        self.results.append(StepResult(name, status, seconds))
        return output

    def require_passed_tests(self, output: str) -> None:
        """Marks the last step failed when it ran pytest and no test passed: a selection of GPU tests that
        all skipped (no GPU visible to torch, a broken build) checked nothing."""
        last = self.results[-1]
        if last.status == "ok" and not re.search(r"\d+ passed", pytest_outcome(output)):
            last.status = "failed (no test passed)"
            print(f"   {last.status}", flush=True)

    def found(self, text: str) -> None:
        """What the last step found (shown in the summary)."""
        self.results[-1].found = text


class _Killer:
    """Kills a process group after ``timeout`` seconds unless cancelled."""

    def __init__(self, process: subprocess.Popen, timeout: float):
        import threading

        self.fired = False
        self._process = process
        self._timer = threading.Timer(timeout, self._kill)
        self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


# --------------------------------------------------------------------------- what each step's output says


def pytest_outcome(output: str) -> str:
    """pytest's final counts line ("412 passed, 28 skipped in 95.2s"), or "" when there is none. The
    line ends with the duration: compute-sanitizer's "ERROR SUMMARY: 0 errors" after it is no count."""
    counts = [
        line.strip("= ")
        for line in output.splitlines()
        if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s\b", line)
    ]
    return counts[-1] if counts else ""


def sanitizer_outcome(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
    return "; ".join(dict.fromkeys(lines))


def last_line_starting(output: str, prefix: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.startswith(prefix)]
    return lines[-1] if lines else ""


def merge_csv(parts: Sequence[Path], target: Path) -> list[dict]:
    """Concatenates CSV files with the same columns into ``target``; returns the rows (none: no file)."""
    rows: list[dict] = []
    columns: list[str] = []
    for part in parts:
        if part.exists():
            with open(part, newline="") as f:
                reader = csv.DictReader(f)
                columns = columns or list(reader.fieldnames or [])
                rows += list(reader)
    if rows:
        with open(target, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return rows


def model_findings(rows: Sequence[dict]) -> list[str]:
    """Per provider and mode, the geometric mean of the time ratio to its baseline (below 1: faster)."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("ratio") and r["provider"] != r.get("baseline"):
            ratios.setdefault((r["provider"], r["mode"]), []).append(float(r["ratio"]))
    return [
        f"{provider} {mode}: time / {'compile' if 'compile' in provider else 'torch'} "
        f"{math.exp(statistics.fmean(math.log(v) for v in values)):.3f} (geomean of {len(values)})"
        for (provider, mode), values in ratios.items()
    ]


def summary_table(results: Sequence[StepResult], budget_s: float, dry_run: bool) -> str:
    header = ("step", "status", "s", "found")
    body = [(r.name, r.status, f"{r.seconds:.0f}", r.found) for r in results]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(3)]
    lines = [
        f"gpu_check {'(dry run) ' if dry_run else ''}summary: {sum(r.seconds for r in results):.0f} s of "
        f"{budget_s:.0f} s budget",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  found",
    ]
    for row in body:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    return "\n".join(lines)


# --------------------------------------------------------------------------- the steps


def kernel_command(dtype: str, layout: str, csv_path: Path, dry_run: bool) -> list[str]:
    command = [PYTHON, "benchmarks/bench_kernels.py", "--dtype", dtype, "--layout", layout, "--csv", str(csv_path)]
    if dry_run:
        dry = ["--device", "cpu", "--threads", "1", "--quick", "--shapes", "tiny", "--providers", DRY_KERNEL_PROVIDERS]
        return [*command, *dry]
    return [*command, "--device", "cuda", "--shapes", "resnet50", "--providers", KERNEL_PROVIDERS]


def model_command(model: str, layout: str, csv_path: Path, dry_run: bool) -> list[str]:
    command = [PYTHON, "benchmarks/bench_models.py", "--models", model, "--layouts", layout, "--csv", str(csv_path)]
    if dry_run:
        return [*command, "--device", "cpu", "--threads", "1", "--quick", "--providers", "torch,bnfused"]
    return [*command, "--device", "cuda", "--providers", MODEL_PROVIDERS]


VALIDATE = """
from benchmarks import bench_models, profile_kernels, providers
profile_kernels.build_parser().parse_args({profile!r})
for name in {kernel!r}.split(","):
    providers.parse(name)
for name in {model!r}.split(","):
    bench_models.parse_provider(name)
unknown = [m for m in {models!r} if m not in bench_models.MODELS]
assert not unknown, f"unknown models: {{unknown}}"
print("benchmark options valid")
"""


def run_all(args: argparse.Namespace, runner: Runner, scratch: Path) -> None:
    out, dry = args.out, args.dry_run
    only = set(args.only.split(",")) if args.only else None

    def wanted(name: str) -> bool:
        return only is None or name in only

    if wanted("install"):
        pip = [PYTHON, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
        runner.run("install", [*pip[:4], "--dry-run", *pip[4:]] if dry else pip, LIMITS["install"])
    if wanted("gpu"):
        if shutil.which("nvidia-smi"):
            smi = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"]
            output = runner.run("gpu", smi, LIMITS["gpu"])
            if output:
                runner.found(" ".join(output.strip().splitlines()[1:2]))
        else:
            runner.skip("gpu", "nvidia-smi not found")
    if wanted("info"):
        output = runner.run("info", [PYTHON, "-m", "bnfused"], LIMITS["info"], copy_to=out / "info.txt")
        chosen = re.findall(r"auto ->\s+(\S+)", output or "")  # the backend auto picks, per device
        if chosen:
            runner.found("auto -> " + ", ".join(chosen))
    if wanted("validate"):
        code = VALIDATE.format(
            kernel=KERNEL_PROVIDERS, model=MODEL_PROVIDERS, models=list(MODEL_NAMES), profile=PROFILE_ARGS
        )
        runner.run("validate", [PYTHON, "-c", code], LIMITS["validate"])
    if wanted("tests"):
        pytest = [PYTHON, "-m", "pytest", *(DRY_TESTS if dry else TESTS)]
        output = runner.run("tests", pytest, LIMITS["tests"], copy_to=out / "pytest.txt")
        if output is not None:
            runner.found(pytest_outcome(output))
    for tool in ("memcheck", "racecheck"):
        if not wanted(tool):
            continue
        if dry and tool == "racecheck":
            runner.skip(tool, "dry run: the same test selection as memcheck")
            continue
        pytest = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SANITIZED_TESTS]
        sanitizer = shutil.which("compute-sanitizer") or (
            "/usr/local/cuda/bin/compute-sanitizer" if Path("/usr/local/cuda/bin/compute-sanitizer").exists() else None
        )
        if sanitizer and not dry:
            command = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--target-processes", "all", *pytest]
        elif dry:
            command = pytest  # the selection still has to be right; on a CPU its CUDA cases skip
        else:
            runner.skip(tool, "compute-sanitizer not found")
            continue
        output = runner.run(tool, command, LIMITS[tool])
        if output is not None:
            runner.found("; ".join(filter(None, [sanitizer_outcome(output), pytest_outcome(output)])))
            if not dry:  # on a CPU the CUDA cases skip by design
                runner.require_passed_tests(output)
    if wanted("kernels"):
        configs = KERNEL_CONFIGS[:2] if dry else KERNEL_CONFIGS
        parts = []
        for dtype, layout in configs:
            part = scratch / f"kernels-{dtype}-{layout}.csv"
            command = kernel_command(dtype, layout, part, dry)
            output = runner.run(f"kernels {dtype} {layout}", command, LIMITS["kernels"])
            if output is not None:
                runner.found(last_line_starting(output, "Found").split("): ", 1)[-1])
                parts.append(part)
        merge_csv(parts, out / "kernels.csv")
        if parts and parts[0].exists():
            runner.run("kernels plot", [PYTHON, "benchmarks/plot_results.py", str(parts[0]),
                                        "--out", str(out / "kernels.png")], LIMITS["plot"])  # fmt: skip
    if wanted("profile"):
        command = [PYTHON, "benchmarks/profile_kernels.py", "--csv", str(out / "profile.csv")]
        runner.run("profile", [*command, "--device", "cpu", "--quick"] if dry else [*command, *PROFILE_ARGS],
                   LIMITS["profile"])  # fmt: skip
    if wanted("deferred"):
        command = [PYTHON, "benchmarks/bench_deferred.py"]
        command += ["--device", "cpu", "--rounds", "1", "--calls", "3"] if dry else ["--rounds", "5", "--calls", "1000"]
        output = runner.run("deferred", command, LIMITS["deferred"], copy_to=out / "deferred.txt")
        if output is not None:
            ratios = re.findall(r"^(\S+)\s+(train|eval) .* ratio (\S+)$", output, flags=re.MULTILINE)
            runner.found(", ".join(f"{case} {mode} {ratio}" for case, mode, ratio in ratios))
    if wanted("models"):
        parts = []
        for layout in MODEL_LAYOUTS:
            for model in DRY_MODEL_NAMES if dry else MODEL_NAMES:
                part = scratch / f"models-{model}-{layout}.csv"
                command = model_command(model, layout, part, dry)
                if runner.run(f"models {model} {layout}", command, LIMITS["models"]) is not None:
                    parts.append(part)
        rows = merge_csv(parts, out / "models.csv")
        if rows:
            runner.results.append(StepResult("models (all)", "ok", 0.0, "; ".join(model_findings(rows))))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    parser.add_argument(
        "--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
        help="on a CPU: every step it can, tiny sizes (also DRY_RUN=1)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
        help=f"the whole check ends within this (default {DEFAULT_BUDGET_S})",
    )  # fmt: skip
    parser.add_argument("--only", help="comma-separated steps to run (e.g. tests,memcheck), the others skipped")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("set OUT or pass --out: the folder the results go to")
    unknown = sorted(set(args.only.split(",")) - set(STEPS)) if args.only else []
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    args.out = Path(args.out).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not args.dry_run:
        # Compile the CUDA sources whatever the build would guess, for this GPU only (sm_90: H100/H200).
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        env["BNFUSED_BUILD_CUDA"] = "1"
    runner = Runner(args.out, time.monotonic() + args.budget, env)
    print(f"gpu_check{' (dry run)' if args.dry_run else ''}: results in {args.out}, budget {args.budget:.0f} s",
          flush=True)  # fmt: skip
    # Per-configuration CSVs live outside OUT: only the merged files come back from a lent machine.
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        run_all(args, runner, Path(scratch))
    table = summary_table(runner.results, args.budget, args.dry_run)
    (args.out / "summary.md").write_text("```\n" + table + "\n```\n")
    print("\n" + table, flush=True)
    return 0 if all(r.status in ("ok", "skipped") for r in runner.results) else 1


if __name__ == "__main__":
    sys.exit(main())
