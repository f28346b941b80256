"""The training loop and test-time inference.

A training step is ``outputs = model(batch)``, ``terms = criterion(outputs, batch)``, backward through the sum
of the ``*_loss`` terms; every term the criterion returns is logged. Everything the loop needs arrives as
arguments; it only reads the few schedule options (``num_epoch``, ``log_period``, ``eval_period``,
``batch_size``) from ``args``. The log lines keep IRRA's form
(``Epoch[e] Iteration[i/N], loss: …, sdm_loss: …, Base Lr: …``) because people parse them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from utils.checkpoint import Checkpointer, unwrap_model
from utils.comm import DistEnv, all_reduce_sum, run_on_main
from utils.errors import UserError
from utils.metrics import Evaluator
from utils.precision import Precision

logger = logging.getLogger(__name__)


@dataclass
class RunningMeans:
    """Per-key running means of the values a model returns, summed on the device (one sync per log line).

    Keys ending in ``_loss`` and ``loss`` are weighted by the batch size; ``mlm_acc`` by 1 per step (IRRA does
    this: its masked-token count varies per batch); other accuracies by the batch size. Under torch.distributed
    :meth:`means` adds up the sums and counts of all ranks, so every rank gets (and rank 0 logs) the means
    over the global batch, the numbers a single process with that batch would log.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def update(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        for key, value in values.items():
            if not (key == "loss" or key.endswith("_loss") or key.endswith("_acc")):
                continue
            weight = 1 if key == "mlm_acc" else batch_size
            value = value.detach().float() * weight
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + weight

    def means(self) -> dict[str, float]:
        """Means over all ranks; a collective when distributed: every rank calls it at the same steps."""
        keys = list(self.sums)
        if not keys:
            return {}
        sums = torch.stack([self.sums[k] for k in keys])
        counts = torch.tensor([self.counts[k] for k in keys], dtype=sums.dtype, device=sums.device)
        totals = all_reduce_sum(torch.cat([sums, counts])).cpu().tolist()
        return {k: s / c for k, s, c in zip(keys, totals[: len(keys)], totals[len(keys):])}


def format_progress(epoch: int, iteration: int, num_iterations: int, means: dict[str, float], lr: float) -> str:
    """IRRA's progress line: ``Epoch[e] Iteration[i/N], loss: x, <key>: x, …, Base Lr: x``."""
    parts = [f"Epoch[{epoch}] Iteration[{iteration}/{num_iterations}]"]
    parts += [f"{key}: {value:.4f}" for key, value in means.items() if value > 0]
    parts.append(f"Base Lr: {lr:.2e}")
    return ", ".join(parts)


def train_one_epoch(model, criterion, train_loader, optimizer, precision: Precision, scaler, device: torch.device,
                    epoch: int, log_period: int, lr: float, show_progress: bool,
                    step_scheduler=None) -> tuple[dict[str, float], dict, int]:
    """Run one epoch; returns the epoch's means, the last step's loss terms and the number of steps.

    ``step_scheduler``: a learning-rate scheduler stepped after every iteration (the log then shows the base rate
    of the current iteration), or None when the schedule is stepped per epoch.
    """
    model.train()
    meters = RunningMeans()
    num_iterations = len(train_loader)
    bar = tqdm(train_loader, total=num_iterations, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=None if show_progress else True)
    ret: dict = {}
    step = 0
    for step, batch in enumerate(bar, start=1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with precision.autocast():
            ret = criterion(model(batch), batch)
            total_loss = sum(v for k, v in ret.items() if k.endswith("_loss"))
        ret["loss"] = total_loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total_loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step_scheduler is not None:
            lr = step_scheduler.get_last_lr()[0]
            step_scheduler.step()
        meters.update(ret, batch["images"].shape[0])
        if step % log_period == 0 or step == num_iterations:  # the same steps on every rank
            means = meters.means()
            if not math.isfinite(means.get("loss", 0.0)):  # global means: every rank stops here together
                raise UserError(f"the training loss became {means['loss']} in epoch {epoch}, iteration {step}; "
                                f"lower --lr, or train with --precision fp32 or amp instead of fp16")
            if step % log_period == 0:
                logger.info(format_progress(epoch, step, num_iterations, means, lr))
            bar.set_postfix(loss=f"{means.get('loss', 0.0):.3f}")
    bar.close()
    return meters.means(), ret, step


def validate(epoch: int, num_epoch: int, model, evaluator, checkpointer: Checkpointer, tb_writer,
             best_top1: float, best_epoch: int) -> tuple[float, int]:
    """Evaluate (on rank 0), log, and save ``best.pth`` when Rank-1 beats ``best_top1``; returns the new best."""
    logger.info("Validation Results - Epoch: %d", epoch)
    top1 = evaluator.eval(unwrap_model(model))
    report = getattr(unwrap_model(model), "training_report", None)
    if callable(report):
        logger.info(report())
    results = getattr(evaluator, "last_results", {}).get("t2i", {})
    if tb_writer is not None:
        tb_writer.add_scalar("val/R1", top1, epoch)
        for key in ("R5", "R10", "mAP", "mINP"):
            if key in results:
                tb_writer.add_scalar(f"val/{key}", results[key], epoch)
    if top1 > best_top1:
        best_top1, best_epoch = top1, epoch
        checkpointer.save("best", epoch=epoch, num_epoch=num_epoch, best_top1=best_top1, best_epoch=best_epoch)
    return float(best_top1), int(best_epoch)


def do_train(start_epoch: int, args, model, criterion, train_loader, evaluator, optimizer, scheduler,
             checkpointer: Checkpointer, precision: Precision, env: DistEnv, scaler=None, tb_writer=None,
             best_top1: float = 0.0, best_epoch: int = 0) -> tuple[float, int]:
    """Train from ``start_epoch`` to ``args.num_epoch`` (1-based, inclusive); returns (best Rank-1, its epoch).

    Each epoch ends with ``last.pth`` (everything needed to resume); ``best.pth`` is written when the
    validation Rank-1 improves. Only rank 0 evaluates, logs to TensorBoard and writes; other ranks wait once
    per evaluation (and stop with rank 0's error if evaluating fails). Apart from the model's own gathers
    and DDP's gradient reduction, training adds one small all-reduce per log line, no per-step barrier.
    """
    scaler = scaler if scaler is not None else precision.grad_scaler()
    global_batch = getattr(args, "batch_size", None)
    logger.info("Start training: epochs %d..%d, %d iterations per epoch", start_epoch, args.num_epoch, len(train_loader))
    for epoch in range(start_epoch, args.num_epoch + 1):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batch_sampler = getattr(train_loader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(epoch)
        lr = scheduler.get_last_lr()[0]
        start = time.time()
        per_iteration = getattr(args, "scheduler_unit", "epoch") == "iteration"
        means, ret, steps = train_one_epoch(model, criterion, train_loader, optimizer, precision, scaler, env.device, epoch,
                                            args.log_period, lr, show_progress=env.is_main,
                                            step_scheduler=scheduler if per_iteration else None)
        elapsed = time.time() - start
        if not per_iteration:
            scheduler.step()
        if env.is_main:
            per_batch = elapsed / max(steps, 1)
            samples = global_batch or train_loader.batch_size
            logger.info("Epoch %d done. Time per batch: %.3f[s] Speed: %.1f[samples/s]", epoch, per_batch,
                        samples / per_batch if per_batch > 0 else float("nan"))
            if tb_writer is not None:
                tb_writer.add_scalar("lr", lr, epoch)
                if "temperature" in ret:
                    tb_writer.add_scalar("temperature", float(ret["temperature"]), epoch)
                for key, value in means.items():
                    tb_writer.add_scalar(key, value, epoch)
        if epoch % args.eval_period == 0 or epoch == args.num_epoch:
            # Rank 0 evaluates; the others wait in this one collective and learn the best score (or its error).
            best_top1, best_epoch = run_on_main(lambda: validate(
                epoch, args.num_epoch, model, evaluator, checkpointer, tb_writer, best_top1, best_epoch))
        checkpointer.save("last", epoch=epoch, num_epoch=args.num_epoch, best_top1=best_top1, best_epoch=best_epoch)
        if tb_writer is not None:
            tb_writer.flush()
    if env.is_main:
        logger.info("best R1: %.3f at epoch %d", best_top1, best_epoch)
    return best_top1, best_epoch


def do_inference(model, test_img_loader, test_txt_loader, autocast=None, chunk_size=None, i2t_metric: bool = False):
    """Evaluate ``model`` on the test loaders; returns the Evaluator (its ``last_results`` hold every metric)."""
    evaluator = Evaluator(test_img_loader, test_txt_loader, autocast=autocast, chunk_size=chunk_size)
    evaluator.eval(unwrap_model(model), i2t_metric=i2t_metric)
    return evaluator
