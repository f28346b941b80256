"""Side-by-side timing of one fp32 CPU training step: this project beside IRRA's official code.

Every variant trains IRRA (sdm+mlm+id, 384x128 images, stride 16, 11,003 identities) from the same random
weights on the same batch, in float32 on the CPU, each in a fresh subprocess:

* ``ours``       — this checkout as it runs by default (fast CPU kernels, :mod:`model.kernels`; the oneDNN
  linear only on CPUs that are not Intel's, see :func:`model.kernels.prefer_onednn_linear`);
* ``ours-plain`` — this checkout inside ``fast_kernels(False)``: plain PyTorch expressions throughout;
* ``ours-fused-adam`` — ``ours`` with the solver's Adam rebuilt as ``Adam(fused=True)`` (same groups and
  hyper-parameters): what a fused optimizer step would add;
* ``before``     — another checkout of this project (``--before_dir``), e.g. the commit before a change;
* ``reference``  — IRRA's official code (``--reference_dir``, github.com/anosorae/IRRA), built with its own
  ``IRRA(args)`` and ``build_optimizer``, stepped as its ``do_train`` does, with the run-time shims listed
  in ``irra_reference.py`` (its files are not touched).

The workers are ``train_project.py`` (this project, from the checkout its ``PYTHONPATH`` names) and
``irra_reference.py`` (the reference). Each runs ``--warmup`` untimed steps, then ``--steps`` timed ones
(forward, backward, optimizer; wall and CPU time); ``--rounds`` repeats the whole sequence of workers so
load changes on a shared machine hit every variant. The table reports medians over all timed steps of the
wall time and of the process's CPU time (all its threads); "cores used" is their ratio: about
``--threads`` when the variant had its cores to itself, less when other jobs took them, which is why the
CPU-time ratios are printed beside the wall ones.
``--check`` first runs one step per variant and compares the losses, every gradient and every updated
parameter with ``ours-plain``; the project's variants must agree within ``1e-5 * max(1, max |value|)``
per tensor (``before`` is expected to agree exactly).

Usage (from the repository root)::

    python benchmarks/train_step.py --reference_dir /tmp/irra_ref --before_dir /tmp/irra_before --check
    python benchmarks/train_step.py --arch tiny --steps 20 --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCHMARKS, os.path.dirname(BENCHMARKS)]  # this folder's modules, then this checkout's packages

from model.kernels import fast_kernels, linear, prefer_onednn_linear  # noqa: E402
from train_common import CUHK_CLASSES, LOSS_NAMES, ROOT, median, project_argv  # noqa: E402
from train_project import build_training, synthetic_batch  # noqa: E402
from utils.options import get_args  # noqa: E402

VARIANTS = ("ours", "ours-plain", "ours-fused-adam", "before", "reference")
TOLERANCE = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B/16", help="CLIP architecture (ViT-B/16, tiny, ...), random weights")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per worker before timing")
    p.add_argument("--rounds", type=int, default=3, help="times the sequence of workers is run")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--variants", default="ours,ours-plain,ours-fused-adam,before,reference",
                   help="comma-separated subset of " + ", ".join(VARIANTS) + " (before/reference need their dir)")
    p.add_argument("--reference_dir", default="", help="checkout of github.com/anosorae/IRRA")
    p.add_argument("--before_dir", default="", help="checkout of this project to compare with (e.g. main)")
    p.add_argument("--check", action="store_true", help="compare losses, gradients and updated weights first")
    p.add_argument("--flops", action="store_true", help="count each variant's FLOPs per step first")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one more step of each variant (torch.profiler, top operators)")
    p.add_argument("--gemm", action="store_true",
                   help="only measure the ViT-B/16 layers' matrix products: F.linear (MKL) vs model.kernels.linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-wait-policy", dest="omp_wait_policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of the workers ('inherit' keeps the environment's)")
    args = p.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    chosen = [v for v in chosen if (v != "before" or args.before_dir) and (v != "reference" or args.reference_dir)]
    for flag, path in (("--reference_dir", args.reference_dir), ("--before_dir", args.before_dir)):
        if path and not os.path.isdir(os.path.join(path, "model")):
            p.error(f"{flag} {path!r} is not a checkout (no model/ folder in it)")
    args.variant_list = chosen
    return args


# ------------------------------------------------------------------------------------------------ parent
def write_inputs(args: argparse.Namespace, folder: str) -> str:
    """Random IRRA weights and one batch, shared by every worker; returns the file's path."""
    argv = project_argv(args.arch, args.batch_size)
    train_args = get_args(argv)
    torch.manual_seed(args.seed)
    model, _ = build_training(train_args, CUHK_CLASSES)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clip_path = os.path.join(folder, "clip.pt")
    torch.save({k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}, clip_path)
    names = ("img_size", "stride_size", "temperature", "cmt_depth", "vocab_size", "id_loss_weight",
             "mlm_loss_weight", "lr", "lr_factor", "bias_lr_factor", "weight_decay", "weight_decay_bias",
             "optimizer", "alpha", "beta", "momentum")
    reference_args = {name: getattr(train_args, name) for name in names}
    reference_args["loss_names"] = LOSS_NAMES
    batch = synthetic_batch(args.batch_size, tuple(train_args.img_size), CUHK_CLASSES, seed=args.seed,
                            text_length=train_args.text_length, vocab_size=train_args.vocab_size)
    path = os.path.join(folder, "inputs.pt")
    torch.save({"argv": argv, "num_classes": CUHK_CLASSES, "state": state, "batch": batch, "clip_path": clip_path,
                "reference_args": reference_args}, path)
    return path


def launch(args: argparse.Namespace, variant: str, inputs: str, out: str, check: bool, flops: bool = False) -> None:
    """Run one variant's worker: ``irra_reference.py`` on the reference, ``train_project.py`` on a checkout
    of this project, each with that checkout first on its ``PYTHONPATH``."""
    script, code_dir = "train_project.py", ROOT
    if variant == "reference":
        script, code_dir = "irra_reference.py", args.reference_dir
    elif variant == "before":
        code_dir = args.before_dir
    cmd = [sys.executable, os.path.join(BENCHMARKS, script), "--variant", variant, "--inputs", inputs, "--out", out,
           "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--check"] if check else []
    cmd += ["--flops"] if flops else []
    cmd += ["--profile"] if args.profile and not (check or flops) else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(code_dir), env.get("PYTHONPATH", "")) if p)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {variant} failed:\n{done.stdout[-4000:]}")


def compare(name: str, got: dict, want: dict) -> tuple[float, float, str]:
    """(largest abs difference, largest difference / max(1, max |want|), the tensor where the latter occurs)."""
    worst_abs, worst_scaled, where = 0.0, 0.0, ""
    for key, ref in want.items():
        if key not in got:
            continue
        ref = torch.as_tensor(ref).double()
        diff = (torch.as_tensor(got[key]).double() - ref).abs().max().item()
        scaled = diff / max(1.0, ref.abs().max().item())
        worst_abs = max(worst_abs, diff)
        if scaled >= worst_scaled:
            worst_scaled, where = scaled, f"{name} {key}"
    return worst_abs, worst_scaled, where


def run_check(args: argparse.Namespace, inputs: str, folder: str) -> bool:
    baseline = "ours-plain" if "ours-plain" in args.variant_list else args.variant_list[0]
    order = [baseline] + [v for v in args.variant_list if v != baseline]
    print(f"\nCheck after one step, against {baseline} (project variants must agree within "
          f"{TOLERANCE:g} x max(1, max|value|) per tensor):\n")
    print("| variant | losses: max abs diff | grads: max abs diff | grads: scaled | updated weights: max abs diff "
          "| worst tensor (scaled) |")
    print("|---|---|---|---|---|---|")
    ok, want, losses = True, None, {}
    for variant in order:
        out = os.path.join(folder, f"check_{variant}.pt")
        launch(args, variant, inputs, out, check=True)
        dump = torch.load(out, weights_only=False)
        os.remove(out)
        losses[variant] = {k: round(x, 6) for k, x in dump["losses"].items()}
        if want is None:
            want = dump
            continue
        loss = compare("loss", dump["losses"], want["losses"])
        grad = compare("grad", dump["grads"], want["grads"])
        param = compare("param", dump["params"], want["params"])
        del dump
        print(f"| {variant} | {loss[0]:.3g} | {grad[0]:.3g} | {grad[1]:.3g} | {param[0]:.3g} | {grad[2]} |")
        if variant != "reference" and max(loss[1], grad[1], param[1]) > TOLERANCE:
            ok = False
    print("\nlosses:", losses)
    return ok


def flops_per_variant(args: argparse.Namespace, inputs: str, folder: str) -> None:
    """GFLOP of one training step of each variant, by torch's FLOP counter (``torch.utils.flop_counter``)."""
    print("\nFLOPs of one step (torch.utils.flop_counter: matrix products, convolutions, attention):\n")
    print("| variant | GFLOP per step | vs reference |")
    print("|---|---|---|")
    counts = {}
    for variant in args.variant_list:
        out = os.path.join(folder, f"flops_{variant}.json")
        launch(args, variant, inputs, out, check=False, flops=True)
        with open(out) as handle:
            counts[variant] = json.load(handle)["gflop"]
    for variant, gflop in counts.items():
        ratio = f"{gflop / counts['reference']:.3f}" if "reference" in counts else "-"
        print(f"| {variant} | {gflop:.1f} | {ratio} |")


def _gflops(fn, flops: int, repeats: int) -> float:
    """GFLOP/s of ``fn`` (median of ``repeats`` calls after two untimed ones)."""
    times = []
    for index in range(repeats + 2):
        start = time.perf_counter()
        fn()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return flops / median(times) / 1e9


def gemm_rates(threads: int, repeats: int = 10) -> None:
    """GFLOP/s of the ViT-B/16 layers' products at batch 8 (1544 image tokens, 616 text tokens), forward and
    forward + backward, through ``model.kernels.linear`` with the fast kernels off (F.linear) and on (oneDNN)."""
    torch.set_num_threads(threads)
    shapes = [(1544, 768, 2304), (1544, 768, 3072), (1544, 3072, 768), (616, 512, 1536), (616, 512, 2048),
              (616, 2048, 512)]
    print(f"\nGFLOP/s of the products of the ViT-B/16 layers at batch 8 ({threads} threads):\n")
    print("| tokens x in -> out | F.linear forward | oneDNN forward | F.linear fwd+bwd | oneDNN fwd+bwd |")
    print("|---|---|---|---|---|")
    for rows, k, n in shapes:
        x = torch.randn(rows, k, requires_grad=True)
        weight = (torch.randn(n, k) / k**0.5).requires_grad_()
        bias = torch.zeros(n, requires_grad=True)
        grad = torch.randn(rows, n)

        def forward():
            return linear(x, weight, bias)

        def forward_backward():
            forward().backward(grad)
            x.grad = weight.grad = bias.grad = None

        cells = []
        for fn, passes in ((forward, 1), (forward_backward, 3)):
            for fast in (False, True):
                with fast_kernels(fast), prefer_onednn_linear(True):  # oneDNN whatever the CPU's vendor
                    cells.append(f"{_gflops(fn, 2 * rows * k * n * passes, repeats):.0f}")
        print(f"| {rows} x {k} -> {n} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gemm:
        gemm_rates(args.threads)
        return 0
    with tempfile.TemporaryDirectory(prefix="train_step_") as folder:
        inputs = write_inputs(args, folder)
        if args.check and not run_check(args, inputs, folder):
            print("CHECK FAILED")
            return 1
        if args.flops:
            flops_per_variant(args, inputs, folder)
        times = {v: {"wall": [], "cpu": [], "peak": 0.0} for v in args.variant_list}
        for _ in range(args.rounds):
            for variant in args.variant_list:
                out = os.path.join(folder, f"{variant}.json")
                launch(args, variant, inputs, out, check=False)
                with open(out) as handle:
                    result = json.load(handle)
                times[variant]["wall"] += result["wall"]
                times[variant]["cpu"] += result["cpu"]
                times[variant]["peak"] = max(times[variant]["peak"], result["peak_rss_mib"])
                if "profile" in result:
                    times[variant]["profile"] = result["profile"]
    print_table(args, times)
    for variant, t in times.items():
        if "profile" in t:
            print(f"\nProfile of one step, {variant}:\n{t['profile']}")
    return 0


def print_table(args: argparse.Namespace, times: dict) -> None:
    total = {v: median([sum(step.values()) for step in t["wall"]]) for v, t in times.items()}
    print(f"\n{args.arch}, batch {args.batch_size}, {LOSS_NAMES}, fp32, CPU, {args.threads} threads, "
          f"{args.rounds} x {args.steps} timed steps per variant (medians; seconds)\n")
    cpu = {v: median([sum(step.values()) for step in t["cpu"]]) for v, t in times.items()}
    print("| variant | s/step (wall) | forward | backward | optimizer | CPU s/step | cores used | peak RSS (MiB) "
          "| vs reference (wall / CPU) | vs ours-plain (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant, t in times.items():
        phases = [median([step[p] for step in t["wall"]]) for p in ("forward", "backward", "optimizer")]
        ratios = [f"{total[base] / total[variant]:.2f}x / {cpu[base] / cpu[variant]:.2f}x" if base in total else "-"
                  for base in ("reference", "ours-plain")]
        print(f"| {variant} | {total[variant]:.3f} | " + " | ".join(f"{x:.3f}" for x in phases)
              + f" | {cpu[variant]:.3f} | {cpu[variant] / total[variant]:.2f} | {t['peak']:.0f} "
              f"| {ratios[0]} | {ratios[1]} |")


if __name__ == "__main__":
    sys.exit(main())
