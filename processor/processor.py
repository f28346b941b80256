"""The training loop and test-time inference.

A training step is ``outputs = model(batch)``, ``terms = criterion(outputs, batch)``, backward through the sum
of the ``*_loss`` terms; every term the criterion returns is logged. Everything the loop needs arrives as
arguments; it only reads the few schedule options (``num_epoch``, ``log_period``, ``eval_period``,
``batch_size``, ``checkpoint_every``) from ``args``. The log lines keep IRRA's form
(``Epoch[e] Iteration[i/N], loss: …, sdm_loss: …, Base Lr: …``) because people parse them.

Where a run stands is a :class:`Progress`; between iterations a :class:`processor.resilience.TrainingGuard`
writes checkpoints, watches for a non-finite loss and honours stop signals, so a run can continue from any
``last.pth`` exactly (docs/reliability.md).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from processor.resilience import TrainingGuard
from utils.checkpoint import Checkpointer, unwrap_model
from utils.comm import DistEnv, all_reduce_sum, run_on_main
from utils.errors import UserError
from utils.metrics import Evaluator
from utils.precision import Precision
from utils.signals import DeferredStop

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

    def state_dict(self) -> dict:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> "RunningMeans":
        return cls({k: v.to(device) for k, v in state["sums"].items()}, dict(state["counts"]))


@dataclass
class Progress:
    """Where a training run stands; ``last.pth`` saves it and a resumed run starts from it.

    Attributes:
        epoch: epochs completed (1-based epochs; 0 before the first).
        iteration: iterations completed in epoch ``epoch + 1`` (0 at an epoch's end).
        global_step: iterations completed since the run began.
        best_top1: best validation Rank-1 so far, reached at ``best_epoch``.
        meters: the running means of epoch ``epoch + 1`` so far (its log lines continue from them).
    """

    epoch: int = 0
    iteration: int = 0
    global_step: int = 0
    best_top1: float = 0.0
    best_epoch: int = 0
    meters: RunningMeans = field(default_factory=RunningMeans)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "iteration": self.iteration, "global_step": self.global_step,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch, "meters": self.meters.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> "Progress":
        return cls(int(state["epoch"]), int(state["iteration"]), int(state["global_step"]), float(state["best_top1"]),
                   int(state["best_epoch"]), RunningMeans.from_state_dict(state["meters"], device))

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.iteration = 0
        self.meters = RunningMeans()


def format_progress(epoch: int, iteration: int, num_iterations: int, means: dict[str, float], lr: float) -> str:
    """IRRA's progress line: ``Epoch[e] Iteration[i/N], loss: x, <key>: x, …, Base Lr: x``."""
    parts = [f"Epoch[{epoch}] Iteration[{iteration}/{num_iterations}]"]
    parts += [f"{key}: {value:.4f}" for key, value in means.items() if value > 0]
    parts.append(f"Base Lr: {lr:.2e}")
    return ", ".join(parts)


def optimizer_step(optimizer, scaler, total_loss: torch.Tensor) -> bool:
    """Backward and step through the gradient scaler; returns whether the scaler skipped the step (fp16
    autocast only: its gradients were not finite, the scale is lowered and the weights stay as they were)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total_loss).backward()
    if not scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale


def train_one_epoch(model, criterion, train_loader, optimizer, precision: Precision, scaler, device: torch.device,
                    epoch: int, log_period: int, lr: float, show_progress: bool, progress: Progress,
                    guard: TrainingGuard | None = None,
                    step_scheduler=None) -> tuple[dict[str, float], dict, int, bool]:
    """Run the iterations of ``epoch`` after ``progress.iteration`` (the loader starts there), updating
    ``progress`` after each; ``guard`` checks, checkpoints and may stop between iterations.

    ``step_scheduler``: a learning-rate scheduler stepped after every iteration (the log then shows the base rate
    of the current iteration), or None when the schedule is stepped per epoch.

    Returns:
        ``(means, terms, steps, stopped)``: the epoch's means, the last step's loss terms, the number of steps
        run here, and whether the guard stopped the epoch early.
    """
    model.train()
    meters = progress.meters
    first = progress.iteration
    num_iterations = first + len(train_loader)
    bar = tqdm(train_loader, total=num_iterations, initial=first, desc=f"epoch {epoch}", leave=False,
               dynamic_ncols=True, disable=None if show_progress else True)
    ret: dict = {}
    stopped = False
    for step, batch in enumerate(bar, start=first + 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with precision.autocast():
            ret = criterion(model(batch), batch)
            total_loss = sum(v for k, v in ret.items() if k.endswith("_loss"))
        ret["loss"] = total_loss
        if optimizer_step(optimizer, scaler, total_loss):
            logger.info("Epoch[%d] Iteration[%d]: the gradient scaler skipped this step (gradients not finite in "
                        "fp16); loss scale now %g", epoch, step, scaler.get_scale())
        else:
            meters.update(ret, batch["images"].shape[0])
            if guard is not None:
                guard.watch.update(epoch, step, ret)
        if step_scheduler is not None:
            lr = step_scheduler.get_last_lr()[0]
            step_scheduler.step()
        progress.iteration, progress.global_step = step, progress.global_step + 1
        if step % log_period == 0 or step == num_iterations:  # the same steps on every rank
            if guard is not None:
                guard.check_finite()
            means = meters.means()
            if step % log_period == 0:
                logger.info(format_progress(epoch, step, num_iterations, means, lr))
            bar.set_postfix(loss=f"{means.get('loss', 0.0):.3f}")
        if guard is not None and guard.after_iteration(progress):
            stopped = True
            break
    bar.close()
    return meters.means(), ret, progress.iteration - first, stopped


def validate(epoch: int, num_epoch: int, model, evaluator, checkpointer: Checkpointer, tb_writer,
             best_top1: float, best_epoch: int, run_facts: dict | None = None) -> tuple[float, int]:
    """Evaluate (on rank 0), log, and save ``best.pth`` (the weights and the run's facts: what evaluation needs)
    when Rank-1 beats ``best_top1``; returns the new best."""
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
        checkpointer.save("best", training_state=False, epoch=epoch, num_epoch=num_epoch, best_top1=best_top1,
                          best_epoch=best_epoch, **({"run": run_facts} if run_facts else {}))
    return float(best_top1), int(best_epoch)


def position_loader(train_loader, epoch: int, start_iteration: int) -> None:
    """Make ``train_loader`` yield ``epoch``'s batches from iteration ``start_iteration + 1`` on."""
    sampler = getattr(train_loader, "sampler", None)
    if start_iteration and not hasattr(sampler, "start_iteration"):
        raise UserError("this training loader cannot start in the middle of an epoch; resume from a checkpoint "
                        "written at the end of an epoch")
    if hasattr(sampler, "start_iteration"):
        sampler.set_epoch(epoch, start_iteration)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(train_loader, "batch_sampler", None)
    if hasattr(batch_sampler, "set_epoch"):
        batch_sampler.set_epoch(epoch)


def do_train(args, model, criterion, train_loader, evaluator, optimizer, scheduler, checkpointer: Checkpointer,
             precision: Precision, env: DistEnv, scaler=None, tb_writer=None, progress: Progress | None = None,
             run_facts: dict | None = None) -> tuple[float, int]:
    """Train from ``progress`` (the start by default) to the end of epoch ``args.num_epoch``; returns (best
    Rank-1, its epoch).

    ``last.pth`` (everything needed to resume exactly) is written at each epoch's end and every
    ``args.checkpoint_every`` iterations; ``best.pth`` (weights and ``run_facts``) when the validation Rank-1
    improves. A stop signal ends the run after the current iteration with a checkpoint
    (:class:`utils.errors.Stopped`); a non-finite loss ends it without one (:class:`utils.errors.TrainingDiverged`).
    Only rank 0 evaluates, logs to TensorBoard and writes; other ranks wait once per evaluation (and stop with
    rank 0's error if evaluating fails). Apart from the model's own gathers and DDP's gradient reduction,
    training adds one small all-reduce per log line and one CPU-side stop vote per iteration, no barrier.
    """
    scaler = scaler if scaler is not None else precision.grad_scaler()
    progress = progress if progress is not None else Progress()
    global_batch = getattr(args, "batch_size", None)
    every = int(getattr(args, "checkpoint_every", 0) or 0)
    with DeferredStop() as stop:
        guard = TrainingGuard(checkpointer, model, every, args.num_epoch, run_facts or {}, stop)
        try:
            logger.info("Start training: epochs %d..%d%s, checkpoint every %s", progress.epoch + 1, args.num_epoch,
                        f" (from iteration {progress.iteration + 1})" if progress.iteration else "",
                        f"{every} iterations and each epoch's end" if every else "epoch's end")
            per_iteration = getattr(args, "scheduler_unit", "epoch") == "iteration"
            for epoch in range(progress.epoch + 1, args.num_epoch + 1):
                position_loader(train_loader, epoch, progress.iteration)
                lr = scheduler.get_last_lr()[0]
                start = time.time()
                means, ret, steps, stopped = train_one_epoch(
                    model, criterion, train_loader, optimizer, precision, scaler, env.device, epoch,
                    args.log_period, lr, env.is_main, progress, guard,
                    step_scheduler=scheduler if per_iteration else None)
                if stopped:
                    raise guard.stopped(progress)
                elapsed = time.time() - start
                if not per_iteration:
                    scheduler.step()
                if env.is_main:
                    log_epoch(epoch, means, ret, lr, steps, elapsed, global_batch or train_loader.batch_size, tb_writer)
                if epoch % args.eval_period == 0 or epoch == args.num_epoch:
                    # Rank 0 evaluates; the others wait in this one collective and learn the best score (or error).
                    progress.best_top1, progress.best_epoch = run_on_main(lambda: validate(
                        epoch, args.num_epoch, model, evaluator, checkpointer, tb_writer, progress.best_top1,
                        progress.best_epoch, run_facts))
                progress.finish_epoch()
                guard.save_last(progress)
                if tb_writer is not None:
                    tb_writer.flush()
                if epoch < args.num_epoch and guard.should_stop():
                    raise guard.stopped(progress)
        finally:
            guard.close()
    if env.is_main:
        logger.info("best R1: %.3f at epoch %d", progress.best_top1, progress.best_epoch)
    return progress.best_top1, progress.best_epoch


def log_epoch(epoch: int, means: dict[str, float], ret: dict, lr: float, steps: int, elapsed: float,
              samples_per_step: int, tb_writer) -> None:
    """The end-of-epoch log line and TensorBoard scalars (rank 0)."""
    per_batch = elapsed / max(steps, 1)
    logger.info("Epoch %d done. Time per batch: %.3f[s] Speed: %.1f[samples/s]", epoch, per_batch,
                samples_per_step / per_batch if per_batch > 0 else float("nan"))
    if tb_writer is not None:
        tb_writer.add_scalar("lr", lr, epoch)
        if "temperature" in ret:
            tb_writer.add_scalar("temperature", float(ret["temperature"]), epoch)
        for key, value in means.items():
            tb_writer.add_scalar(key, value, epoch)


def do_inference(model, test_img_loader, test_txt_loader, autocast=None, chunk_size=None, i2t_metric: bool = False):
    """Evaluate ``model`` on the test loaders; returns the Evaluator (its ``last_results`` hold every metric)."""
    evaluator = Evaluator(test_img_loader, test_txt_loader, autocast=autocast, chunk_size=chunk_size)
    evaluator.eval(unwrap_model(model), i2t_metric=i2t_metric)
    return evaluator
