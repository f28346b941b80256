"""Training throughput of IRRA (sdm+mlm+id) per precision, with and without ``torch.compile``.

For every (precision, compile) pair a fresh subprocess builds the training loader (``build_dataloader``,
IRRA's augmented train transform, on a synthetic CUHK-PEDES written by ``datasets.synthetic`` unless
``--root_dir`` names real data), the model from scratch (``build_model``), the optimizer
(``build_optimizer``) and the precision (``utils.precision``), then runs ``--warmup`` and ``--steps``
training steps (:func:`train_common.train_step`). Reported per pair: samples/s (batch / median step time),
median seconds per step split into data (waiting for the loader and the copy to the device), forward,
backward and optimizer; the process's CPU seconds per step (all threads; on a shared CPU, wall time over
CPU time shows how many cores the run really had); the first step (which includes compilation; with
``--rounds`` the slowest, i.e. the one that compiled without a warm cache); peak memory (CUDA: max allocated;
CPU: the process's peak RSS); model FLOPs per step, counted once on the eager model with
``torch.utils.flop_counter.FlopCounterMode`` over forward and backward (the optimizer is not counted); and
the utilisation FLOPs / (median step time x ``--peak_tflops``).

Precisions come from ``utils.precision``; pairs a device cannot run are skipped with a note (fp16 — IRRA's
half weights — needs CUDA; bf16 needs hardware support; ``--compile on`` needs what
``utils.compile.compile_problem`` checks; a precision this checkout does not know is skipped too).

Usage (from the repository root)::

    python benchmarks/train_throughput.py --preset cpu --rounds 3             # tiny CLIP, batch 16, CPU
    python benchmarks/train_throughput.py --preset gpu --peak_tflops 989      # ViT-B/16, batch 64, CUDA
    python benchmarks/train_throughput.py --preset gpu --precisions fp16,amp --compile off \
        --peak_tflops fp16=989,amp=989
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
from torch.utils import flop_counter

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCHMARKS, os.path.dirname(BENCHMARKS)]  # this folder's modules, then this checkout's packages

from datasets import build_dataloader  # noqa: E402
from datasets.synthetic import write_synthetic  # noqa: E402
from solver import build_optimizer  # noqa: E402
from train_common import (PHASES, PhaseClock, loss_terms, median, peak_rss_mib, project_argv,  # noqa: E402
                          register_cpu_flop_formulas, train_step)
from train_project import build_training  # noqa: E402
from utils.compile import compile_problem, maybe_compile  # noqa: E402
from utils.options import get_args  # noqa: E402
from utils.precision import PRECISIONS, Precision, resolve_precision  # noqa: E402

PRESETS = {
    "cpu": dict(device="cpu", arch="tiny", batch_size=16, precisions="fp32,amp,bf16,fp16", compile="off,on",
                steps=10, warmup=3, num_workers=1, threads=2),
    "gpu": dict(device="cuda", arch="ViT-B/16", batch_size=64, precisions="fp16,amp,bf16,fp32", compile="off,on",
                steps=20, warmup=5, num_workers=8, threads=0),
}
SAMPLES_PER_ID = 8 * 4 // 6  # training captions per synthetic identity (4 images x 2 captions, 4 of 6 ids train)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu", help="defaults for the flags below")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--arch", help="CLIP architecture, random weights (tiny, ViT-B/16, ...)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--precisions", help="comma-separated, e.g. fp32,amp,bf16,fp16")
    p.add_argument("--compile", help="comma-separated subset of off,on")
    p.add_argument("--steps", type=int, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=1, help="runs of every pair, interleaved (medians over all)")
    p.add_argument("--warmup", type=int, help="untimed steps first (the first one compiles)")
    p.add_argument("--num_workers", type=int, help="data loader workers")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak_tflops", default="",
                   help="peak of the device in TFLOP/s for the utilisation: one number, or precision=number pairs")
    p.add_argument("--root_dir", default="", help="dataset root holding CUHK-PEDES/ (default: synthetic, temporary)")
    p.add_argument("--image_size", type=int, nargs=2, default=(256, 96), metavar=("H", "W"),
                   help="size of the synthetic JPEGs (CUHK-PEDES images are about 100-300 px high)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    args.precision_list = [x.strip() for x in args.precisions.split(",") if x.strip()]
    args.compile_list = [x.strip() for x in args.compile.split(",") if x.strip()]
    if not set(args.compile_list) <= {"off", "on"} or not args.compile_list:
        parser.error(f"--compile takes off, on or off,on; got {args.compile!r}")
    try:
        args.peaks = parse_peaks(args.peak_tflops, args.precision_list)
    except ValueError as err:
        parser.error(str(err))
    return args


def parse_peaks(text: str, precisions: list[str]) -> dict[str, float]:
    """``'989'`` -> the same peak for every precision; ``'fp32=67,amp=989'`` -> per precision (TFLOP/s)."""
    if not text:
        return {}
    if "=" not in text:
        return {p: float(text) for p in precisions}
    peaks = {}
    for pair in text.split(","):
        name, _, value = pair.partition("=")
        if not value:
            raise ValueError(f"--peak_tflops: {pair!r} is not precision=number")
        peaks[name.strip()] = float(value)
    return peaks


# ----------------------------------------------------------------------------------------------- support
def skip_reason(precision: str, compiled: bool, device: torch.device) -> str | None:
    """Why this pair cannot run on ``device``, or None."""
    if precision not in PRECISIONS:
        return f"'{precision}' is not a --precision of this checkout ({', '.join(PRECISIONS)})"
    if precision == "fp16" and device.type != "cuda":
        return "fp16 (IRRA's half weights) needs CUDA"
    if precision in ("amp", "bf16") and not bf16_supported(device):
        if precision == "bf16" or device.type == "cpu":
            return f"{precision} needs bfloat16, which this {device.type} does not support"
    if compiled:
        problem = compile_problem(device)
        if problem:
            return f"compile needs {problem}"
    return None


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ------------------------------------------------------------------------------------------------- FLOPs
def count_flops(model, batch, autocast, criterion=None) -> int:
    """FLOPs of one forward and backward pass (FlopCounterMode), gradients cleared afterwards."""
    register_cpu_flop_formulas()
    with flop_counter.FlopCounterMode(display=False) as counter:
        with autocast():
            _, loss = loss_terms(model, batch, criterion)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()




# ----------------------------------------------------------------------------------------------- workers
def run_worker(args: argparse.Namespace) -> dict:
    precision_name, compile_flag = args.worker.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = ["--root_dir", args.root_dir, "--dataset_name", "CUHK-PEDES", "--num_workers", str(args.num_workers),
             "--img_aug"]
    train_args = get_args(project_argv(args.arch, args.batch_size, precision_name, args.device, extra))
    device = torch.device(args.device)
    torch.manual_seed(0)
    train_loader, _, _, num_classes = build_dataloader(train_args)
    model, criterion = build_training(train_args, num_classes)
    model = model.to(device)
    model.train()
    optimizer = build_optimizer(train_args, model)
    precision = Precision(resolve_precision(train_args.precision, device), device)
    scaler = precision.grad_scaler()
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def batches():
        while True:
            yield from train_loader

    stream = batches()
    first = {k: v.to(device) for k, v in next(stream).items()}
    flops = count_flops(model, first, precision.autocast, criterion)
    model_to_run = maybe_compile(model, compile_flag == "on")
    clock = PhaseClock(sync)
    steps, first_step = [], 0.0
    for index in range(args.warmup + args.steps):
        if index == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock.start()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        clock.mark("data")
        train_step(model_to_run, batch, optimizer, clock, precision.autocast, scaler, criterion)
        if index == 0:
            first_step = sum(clock.wall.values())
        if index >= args.warmup:
            steps.append({"wall": dict(clock.wall), "cpu": sum(clock.cpu.values())})
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    return {"steps": steps, "first_step": first_step, "flops": flops, "peak_mib": peak,
            "amp_dtype": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else ""}


def write_dataset(args: argparse.Namespace, folder: str) -> str:
    """A synthetic CUHK-PEDES with enough training captions for warm-up and timed steps; returns its root."""
    needed = (args.warmup + args.steps + 1) * args.batch_size
    num_ids = max(60, math.ceil(needed / SAMPLES_PER_ID) + 12)
    write_synthetic(folder, "CUHK-PEDES", num_ids=num_ids, image_size=tuple(args.image_size))
    return folder


def launch(args: argparse.Namespace, precision: str, compiled: str, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{precision},{compiled}", "--preset", args.preset,
           "--device", args.device, "--arch", args.arch, "--batch_size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--num_workers", str(args.num_workers),
           "--threads", str(args.threads), "--root_dir", args.root_dir, "--json", out]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        return {"error": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"exit {done.returncode}",
                "log": done.stdout[-3000:]}
    with open(out) as handle:
        return json.load(handle)


def summarise(result: dict, batch_size: int, peak_tflops: float | None) -> dict:
    steps = [s["wall"] for s in result["steps"]]
    phases = {p: median([s.get(p, 0.0) for s in steps]) for p in PHASES}
    total = median([sum(s.values()) for s in steps])
    cpu = median([s["cpu"] for s in result["steps"]])
    achieved = result["flops"] / total if total > 0 else float("nan")
    return {"samples_per_s": batch_size / total, "step_s": total, **phases, "cpu_s": cpu,
            "first_step_s": result["first_step"],
            "peak_mib": result["peak_mib"], "gflops_per_step": result["flops"] / 1e9,
            "achieved_tflops": achieved / 1e12,
            "utilisation": achieved / (peak_tflops * 1e12) if peak_tflops else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        with open(args.json, "w") as handle:
            json.dump(result, handle)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; run the CPU preset or use a GPU machine")
    pairs, notes = [], []
    for precision in args.precision_list:
        for compiled in args.compile_list:
            reason = skip_reason(precision, compiled == "on", device)
            if reason:
                notes.append(f"{precision}, compile {compiled}: skipped, {reason}")
            else:
                pairs.append((precision, compiled))
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="throughput_") as folder:
        if not args.root_dir:
            args.root_dir = write_dataset(args, os.path.join(folder, "data"))
        for _ in range(args.rounds):
            for pair in pairs:
                if "error" in results.get(pair, {}):
                    continue
                result = launch(args, *pair, os.path.join(folder, "result.json"))
                if "error" in result:
                    print(result["log"], file=sys.stderr)
                    results[pair] = result
                elif pair in results:  # a later round: more steps, the slowest first step, the largest peak
                    merged = results[pair]
                    merged["steps"] += result["steps"]
                    merged["first_step"] = max(merged["first_step"], result["first_step"])
                    merged["peak_mib"] = max(merged["peak_mib"], result["peak_mib"])
                else:
                    results[pair] = result
    rows = []
    for (precision, compiled), result in results.items():
        if "error" in result:
            notes.append(f"{precision}, compile {compiled}: failed, {result['error']}")
            continue
        row = summarise(result, args.batch_size, args.peaks.get(precision))
        row.update(precision=precision, compile=compiled, amp_dtype=result["amp_dtype"])
        rows.append(row)
    print_table(args, rows, notes)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "peaks"}, "rows": rows,
                       "notes": notes}, handle, indent=1)
    return 0


def print_table(args: argparse.Namespace, rows: list[dict], notes: list[str]) -> None:
    print(f"\n{args.arch}, batch {args.batch_size}, sdm+mlm+id, {args.device}, {args.num_workers} loader workers, "
          f"{args.threads or 'default'} threads, medians of {args.rounds} x {args.steps} steps, each run after "
          f"{args.warmup} warm-up steps; seconds\n")
    print("| precision | compile | samples/s | s/step | data | forward | backward | optimizer | CPU s/step "
          "| first step (s) | peak memory (MiB) | GFLOP/step | TFLOP/s | utilisation |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["precision"] + (f" ({r['amp_dtype']})" if r["amp_dtype"] else "")
        util = f"{100 * r['utilisation']:.1f}%" if r["utilisation"] is not None else "-"
        print(f"| {name} | {r['compile']} | {r['samples_per_s']:.1f} | {r['step_s']:.3f} | {r['data']:.3f} "
              f"| {r['forward']:.3f} | {r['backward']:.3f} | {r['optimizer']:.3f} | {r['cpu_s']:.3f} "
              f"| {r['first_step_s']:.1f} "
              f"| {r['peak_mib']:.0f} | {r['gflops_per_step']:.1f} | {r['achieved_tflops']:.3f} | {util} |")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    sys.exit(main())
