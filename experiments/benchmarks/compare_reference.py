"""Time hdkd against the original research flow on the same models, rows and settings, side by side.

Each repeat runs three processes one after another, the side that goes first alternating between repeats:

- ``reference``: the original research flow (``reference_flow.py``, called by path);
- ``hdkd``: ``python -m hdkd train``, the real entry point, with its MLflow run, report and logged model;
- ``hdkd untracked``: ``untracked_run.py``, the same pipeline calls without MLflow.

Every process starts cold: a fresh hdkd ``cache_dir``, a fresh sqlite MLflow store, and a fresh home folder (so
hdkd's remembered weight digests are recomputed). The OS file cache and third-party caches (matplotlib fonts,
Python bytecode) stay warm for both sides alike.

The phases are lined up so that like is compared with like:

- teacher labels: the reference's per-example beam search over the training questions; hdkd's teacher pass over
  the training split, which also stores the teacher's hidden states for those labels;
- training: the optimizer loop. The reference runs the teacher at every step; hdkd reads cached hidden states.
  hdkd's time excludes the evaluations and the checkpoint writes that the Trainer does inside its loop (the
  checkpoint time is printed beside it, and counts in the end-to-end time);
- evaluation: the reference's teacher and student answers on the validation questions; for hdkd, its teacher's
  validation answers and hidden states (computed in its teacher phase) plus the student evaluation
  (validation loss and student answers);
- end to end: the process's wall time from start to exit, imports, model loading and MLflow logging included.

Peak memory is each process's maximum resident set size (``wait4``). The training phase's FLOPs are counted with
``torch.utils.flop_counter`` on meta-device copies of the models, for the batch shapes each side ran: the
reference pads every prompt to 512 tokens and every label to 5 and runs the teacher forward at every step; hdkd's
shapes are recorded by the untracked run. Matrix-multiply peaks are measured here with square ``torch.mm``.

The process exits with status 1 when a target is missed, so the script can gate a change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNTRACKED_RUN = Path(__file__).resolve().parent / "untracked_run.py"
# The reference script sits in the shared folder beside the checkout.
DEFAULT_REFERENCE = REPO.parent / "shared" / "data" / "bench" / "reference_flow.py"

# The reference flow pads every prompt to 512 tokens and every label to 5 tokens (its encode() and label call).
REFERENCE_SOURCE_LENGTH = 512
REFERENCE_LABEL_LENGTH = 5

SIDES = ("reference", "hdkd", "hdkd_untracked")
PHASES = ("labels", "training", "evaluation")

# (name, minimum reference/hdkd ratio): times are divided reference by hdkd, throughput hdkd by reference.
TARGETS = {"end_to_end": 6.0, "labels": 10.0, "evaluation": 8.0, "train_examples_per_second": 8.0}


@dataclass
class Sample:
    """One process's measurements."""

    side: str
    repeat: int
    wall_seconds: float
    max_rss_bytes: int
    cpu_seconds: tuple[float, float]  # user, system
    phases: dict[str, float]
    details: dict = field(default_factory=dict)


# --- Command line -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time hdkd against the original research flow, side by side.")
    parser.add_argument("--teacher", required=True, help="teacher model directory")
    parser.add_argument("--student", required=True, help="student model directory")
    parser.add_argument("--train-file", required=True, help="AQuA-RAT JSON-lines file; its first --n-train rows "
                        "are used")
    parser.add_argument("--validation-file", required=True, help="AQuA-RAT JSON-lines file; its first --n-val rows "
                        "are used")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE),
                        help=f"path of the original flow's script (default {DEFAULT_REFERENCE}, whatever the "
                             "current folder)")
    parser.add_argument("--n-train", type=int, default=32, help="training rows (default 32)")
    parser.add_argument("--n-val", type=int, default=16, help="validation rows (default 16)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    parser.add_argument("--beams", type=int, default=3, help="beam count for every generation (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="generated tokens per answer; the reference gets this + 1 as --gen-max-length, which "
                        "counts the decoder start token (default 8)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each side, alternating; the medians are reported (default 3)")
    parser.add_argument("--json-out", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with logs and stores")
    args = parser.parse_args(argv)

    problems = []
    for name in ("teacher", "student"):
        if not Path(getattr(args, name)).is_dir():
            problems.append(f"--{name} {getattr(args, name)!r}: directory not found")
    for name in ("train_file", "validation_file", "reference"):
        if not Path(getattr(args, name)).is_file():
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)!r}: file not found")
    for name in ("n_train", "n_val", "epochs", "batch_size", "beams", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if problems:
        parser.error("; ".join(problems))
    for name in ("teacher", "student", "train_file", "validation_file", "reference"):
        setattr(args, name, str(Path(getattr(args, name)).resolve()))
    return args


# --- Machine ----------------------------------------------------------------------------------------------


def matmul_peak_flops(sizes: tuple[int, ...] = (1024, 2048), calls: int = 10, trials: int = 5) -> dict[str, float]:
    """Measure the best fp32 and bf16 ``torch.mm`` rate (FLOP/s) over square sizes, with torch's thread count."""
    import torch

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)  # warm-up: oneDNN picks its kernel on the first call
            for _ in range(trials):
                started = time.perf_counter()
                for _ in range(calls):
                    torch.mm(a, b)
                best = max(best, 2 * n ** 3 * calls / (time.perf_counter() - started))
        peaks[name] = best
    return peaks


def describe_machine() -> dict[str, object]:
    import platform

    import torch

    model = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "python": platform.python_version(), "torch": torch.__version__}


# --- Running the sides ------------------------------------------------------------------------------------


def first_rows(source: str, n: int, target: Path) -> Path:
    """Copy the first ``n`` non-empty lines of a JSON-lines file, the rows the reference takes with --n-train."""
    with open(source, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()][:n]
    if len(lines) < n:
        raise SystemExit(f"{source} has only {len(lines)} rows, fewer than the {n} requested")
    target.write_text("".join(lines), encoding="utf-8")
    return target


def run_process(command: list[str], cwd: Path, env: dict[str, str],
                log_prefix: Path) -> tuple[float, int, tuple[float, float], str]:
    """Run ``command`` to completion; return its wall time, peak RSS in bytes, user and system CPU seconds and
    standard output."""
    stdout_path, stderr_path = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        # wait4 returns the resource usage of this one child, so ru_maxrss is its own peak.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with {process.returncode}; last lines of "
                           f"{stderr_path}:\n" + "\n".join(tail))
    cpu = (usage.ru_utime, usage.ru_stime)
    return wall, usage.ru_maxrss * 1024, cpu, stdout_path.read_text(errors="replace")


def cold_environment(folder: Path) -> dict[str, str]:
    """Return the environment of one process: a fresh home, MLflow store and Python path to this checkout."""
    home = folder / "home"
    home.mkdir(parents=True)
    env = dict(os.environ)
    real_home = Path.home()
    env.update({
        "HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": os.environ.get("HF_HOME", str(real_home / ".cache" / "huggingface")),
    })
    matplotlib_cache = real_home / ".cache" / "matplotlib"
    if "MPLCONFIGDIR" not in os.environ and matplotlib_cache.is_dir():
        env["MPLCONFIGDIR"] = str(matplotlib_cache)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    return env


def hdkd_overrides(args: argparse.Namespace, train_file: Path, validation_file: Path, folder: Path) -> list[str]:
    """Return ``--set`` pairs that make hdkd use exactly the given rows and the benchmark's settings."""
    values = {
        "teacher": args.teacher, "student": args.student,
        "data.train_file": train_file, "data.validation_file": validation_file,
        # portion 1.0 with both minimums at the row counts: every row, in file order.
        "data.portion": 1.0, "data.min_train_examples": args.n_train, "data.min_validation_examples": args.n_val,
        "generation.max_new_tokens": args.max_new_tokens, "generation.num_beams": args.beams,
        "training.num_train_epochs": args.epochs, "training.per_device_train_batch_size": args.batch_size,
        "output_dir": folder / "outputs", "cache_dir": folder / "cache",
        "tracking.experiment_name": "hdkd-benchmark",
    }
    pairs = []
    for key, value in values.items():
        pairs += ["--set", f"{key}={value}"]
    return pairs


def run_reference(args: argparse.Namespace, folder: Path, repeat: int) -> Sample:
    command = [sys.executable, args.reference, "--teacher", args.teacher, "--student", args.student,
               "--train-file", args.train_file, "--validation-file", args.validation_file,
               "--n-train", str(args.n_train), "--n-val", str(args.n_val), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--beams", str(args.beams),
               "--gen-max-length", str(args.max_new_tokens + 1)]
    wall, rss, cpu, stdout = run_process(command, folder, cold_environment(folder), folder / "reference")
    result = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    phases = {"labels": result["label_s"], "training": result["train_s"], "evaluation": result["eval_s"]}
    return Sample("reference", repeat, wall, rss, cpu, phases, result)


def _hdkd_phases(phase_seconds: dict[str, float]) -> dict[str, float]:
    return {"labels": phase_seconds["teacher_train"], "training": phase_seconds["training"],
            "evaluation": phase_seconds["teacher_validation"] + phase_seconds["evaluation"],
            "checkpoints": phase_seconds["checkpoints"]}


def run_hdkd(args: argparse.Namespace, folder: Path, repeat: int, train_file: Path, validation_file: Path) -> Sample:
    command = [sys.executable, "-m", "hdkd", "train", *hdkd_overrides(args, train_file, validation_file, folder)]
    wall, rss, cpu, _ = run_process(command, folder, cold_environment(folder), folder / "hdkd")
    report = json.loads((folder / "outputs" / "report.json").read_text(encoding="utf-8"))
    return Sample("hdkd", repeat, wall, rss, cpu, _hdkd_phases(report["phase_seconds"]),
                  {"phase_seconds": report["phase_seconds"], "teacher_generations": report["teacher_generations"]})


def run_hdkd_untracked(args: argparse.Namespace, folder: Path, repeat: int, train_file: Path,
                       validation_file: Path) -> Sample:
    command = [sys.executable, str(UNTRACKED_RUN), *hdkd_overrides(args, train_file, validation_file, folder)]
    wall, rss, cpu, stdout = run_process(command, folder, cold_environment(folder), folder / "hdkd_untracked")
    result = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    return Sample("hdkd_untracked", repeat, wall, rss, cpu, _hdkd_phases(result["phase_seconds"]), result)


# --- FLOPs ------------------------------------------------------------------------------------------------


class FlopCounter:
    """Count matmul FLOPs of one forward (and optionally backward) pass for given shapes, on meta tensors."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            self.model = AutoModelForSeq2SeqLM.from_config(config)
        self._known: dict[tuple, int] = {}

    def count(self, batch: int, source_length: int, target_length: int, backward: bool) -> int:
        key = (batch, source_length, target_length, backward)
        if key not in self._known:
            self._known[key] = self._measure(*key)
        return self._known[key]

    def _measure(self, batch: int, source_length: int, target_length: int, backward: bool) -> int:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        # No attention mask: transformers' mask helpers read values, which meta tensors do not have. A mask
        # changes no matmul shape, so the count is the same.
        input_ids = torch.ones(batch, source_length, dtype=torch.long, device="meta")
        decoder_input_ids = torch.ones(batch, target_length, dtype=torch.long, device="meta")
        self.model.train(backward)
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(backward):
            logits = self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
            if backward:
                logits.sum().backward()
        return counter.get_total_flops()


def training_flops(args: argparse.Namespace, hdkd_shapes: list[list[int]]) -> dict[str, int]:
    """Return the matmul FLOPs of each side's training phase."""
    student = FlopCounter(args.student)
    teacher = FlopCounter(args.teacher)
    reference = 0
    for _ in range(args.epochs):
        for start in range(0, args.n_train, args.batch_size):
            batch = min(args.batch_size, args.n_train - start)
            shape = (batch, REFERENCE_SOURCE_LENGTH, REFERENCE_LABEL_LENGTH)
            reference += student.count(*shape, backward=True) + teacher.count(*shape, backward=False)
    hdkd = sum(student.count(batch, source, target, backward=True) for batch, source, target in hdkd_shapes)
    return {"reference": reference, "hdkd": hdkd}


# --- Report -----------------------------------------------------------------------------------------------


def median(samples: list[Sample], value) -> float:
    return statistics.median(value(s) for s in samples)


def summarise(samples: list[Sample], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Return the median of every measurement per side."""
    examples = args.n_train * args.epochs
    summary = {}
    for side in SIDES:
        mine = [s for s in samples if s.side == side]
        phases = (*PHASES, "checkpoints")
        summary[side] = {phase: median(mine, lambda s, p=phase: s.phases.get(p, 0.0)) for phase in phases}
        summary[side]["end_to_end"] = median(mine, lambda s: s.wall_seconds)
        summary[side]["train_examples_per_second"] = examples / summary[side]["training"]
        summary[side]["max_rss_bytes"] = max(s.max_rss_bytes for s in mine)
    return summary


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """Speed-ups of hdkd (tracked) over the reference; >1 means hdkd is faster or, for memory, smaller."""
    reference, hdkd = summary["reference"], summary["hdkd"]
    out = {name: reference[name] / hdkd[name] for name in (*PHASES, "end_to_end")}
    out["end_to_end_untracked"] = reference["end_to_end"] / summary["hdkd_untracked"]["end_to_end"]
    out["train_examples_per_second"] = hdkd["train_examples_per_second"] / reference["train_examples_per_second"]
    out["max_rss"] = reference["max_rss_bytes"] / hdkd["max_rss_bytes"]
    return out


def print_report(samples: list[Sample], summary: dict, speedups: dict, flops: dict, peaks: dict,
                 bf16: bool, load: dict) -> bool:
    print("\nPer process (seconds; RSS in MiB; checkpoints: hdkd's checkpoint writes, not part of training):")
    print(f"{'repeat':>6}  {'side':<15}{'labels':>9}{'training':>10}{'checkpoints':>13}{'evaluation':>12}"
          f"{'end to end':>12}{'peak RSS':>10}{'CPU user':>10}{'CPU sys':>9}")
    for s in samples:
        checkpoints = f"{s.phases['checkpoints']:.2f}" if "checkpoints" in s.phases else "-"
        print(f"{s.repeat:>6}  {s.side:<15}{s.phases['labels']:>9.2f}{s.phases['training']:>10.2f}{checkpoints:>13}"
              f"{s.phases['evaluation']:>12.2f}{s.wall_seconds:>12.2f}{s.max_rss_bytes / 2 ** 20:>10.0f}"
              f"{s.cpu_seconds[0]:>10.1f}{s.cpu_seconds[1]:>9.1f}")

    reference, hdkd, untracked = summary["reference"], summary["hdkd"], summary["hdkd_untracked"]
    rows = [
        ("teacher labels (s)", "labels", "{:.2f}"),
        ("training (s)", "training", "{:.2f}"),
        ("evaluation (s)", "evaluation", "{:.2f}"),
        ("end to end, tracked (s)", "end_to_end", "{:.2f}"),
        ("training examples/s", "train_examples_per_second", "{:.2f}"),
    ]
    print("\nMedians (hdkd = python -m hdkd train with MLflow tracking):")
    print(f"{'':<32}{'reference':>11}{'hdkd':>9}{'ratio':>9}{'target':>9}")
    for label, key, fmt in rows:
        target = f">={TARGETS[key]:g}x" if key in TARGETS else ""
        print(f"{label:<32}{fmt.format(reference[key]):>11}{fmt.format(hdkd[key]):>9}{speedups[key]:>8.1f}x"
              f"{target:>9}")
    print(f"{'end to end, untracked (s)':<32}{reference['end_to_end']:>11.2f}{untracked['end_to_end']:>9.2f}"
          f"{speedups['end_to_end_untracked']:>8.1f}x")
    print(f"{'peak RSS (MiB)':<32}{reference['max_rss_bytes'] / 2 ** 20:>11.0f}{hdkd['max_rss_bytes'] / 2 ** 20:>9.0f}"
          f"{speedups['max_rss']:>8.1f}x{'>=1x':>9}")
    with_checkpoints = hdkd["training"] + hdkd["checkpoints"]
    print(f"{'training with checkpoints (s)':<32}{reference['training']:>11.2f}{with_checkpoints:>9.2f}"
          f"{reference['training'] / with_checkpoints:>8.1f}x")

    print(f"\nMatmul peak on this machine: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} "
          f"GFLOP/s. hdkd bf16 autocast: {'on' if bf16 else 'off'}; the reference computes in fp32.")
    for side in ("reference", "hdkd"):
        rate = flops[side] / summary[side]["training"]
        print(f"  {side:<10} training: {flops[side] / 1e12:.2f} TFLOP in {summary[side]['training']:.2f} s = "
              f"{rate / 1e9:.0f} GFLOP/s, {rate / peaks['fp32']:.0%} of the fp32 peak, "
              f"{rate / peaks['bf16']:.0%} of the bf16 peak")
    print(f"Load average (1 min) before: {load['before']:.2f}, after: {load['after']:.2f}")

    checks = [(f"end to end (tracked) {speedups['end_to_end']:.1f}x faster",
               speedups["end_to_end"] >= TARGETS["end_to_end"]),
              (f"teacher labels {speedups['labels']:.1f}x faster", speedups["labels"] >= TARGETS["labels"]),
              (f"evaluation {speedups['evaluation']:.1f}x faster", speedups["evaluation"] >= TARGETS["evaluation"]),
              (f"training examples/s {speedups['train_examples_per_second']:.1f}x higher",
               speedups["train_examples_per_second"] >= TARGETS["train_examples_per_second"]),
              (f"peak RSS {hdkd['max_rss_bytes'] / 2 ** 20:.0f} MiB vs {reference['max_rss_bytes'] / 2 ** 20:.0f} "
               "MiB", hdkd["max_rss_bytes"] <= reference["max_rss_bytes"])]
    print("\nTargets:")
    for text, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    return all(ok for _, ok in checks)


# --- Main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = {"before": os.getloadavg()[0]}
    root = Path(tempfile.mkdtemp(prefix="hdkd-benchmark-"))
    print(f"logs and stores: {root}", flush=True)
    machine = describe_machine()
    peaks = matmul_peak_flops()
    train_file = first_rows(args.train_file, args.n_train, root / "train.json")
    validation_file = first_rows(args.validation_file, args.n_val, root / "validation.json")

    samples: list[Sample] = []
    for repeat in range(args.repeats):
        order = ["reference", "hdkd", "hdkd_untracked"]
        if repeat % 2:
            order.reverse()
        for side in order:
            folder = root / f"{repeat}-{side}"
            folder.mkdir()
            print(f"repeat {repeat + 1}/{args.repeats}: {side} ...", flush=True)
            if side == "reference":
                sample = run_reference(args, folder, repeat)
            elif side == "hdkd":
                sample = run_hdkd(args, folder, repeat, train_file, validation_file)
            else:
                sample = run_hdkd_untracked(args, folder, repeat, train_file, validation_file)
            print(f"  {sample.wall_seconds:.1f} s end to end, phases {sample.phases}", flush=True)
            samples.append(sample)
    load["after"] = os.getloadavg()[0]

    # Shapes are the same in every hdkd run (same data and seed); the first untracked run's are used.
    shapes = next(s for s in samples if s.side == "hdkd_untracked").details["train_batch_shapes"]
    bf16 = next(s for s in samples if s.side == "hdkd_untracked").details["bf16"]
    flops = training_flops(args, shapes)
    summary = summarise(samples, args)
    speedups = ratios(summary)
    ok = print_report(samples, summary, speedups, flops, peaks, bf16, load)

    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k not in ("json_out", "keep")},
            "machine": machine, "load_average": load, "matmul_peak_flops": peaks, "training_flops": flops,
            "hdkd_bf16": bf16, "hdkd_train_batch_shapes": shapes, "summary": summary, "ratios": speedups,
            "samples": [vars(s) for s in samples],
        }, indent=1, default=str) + "\n", encoding="utf-8")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
