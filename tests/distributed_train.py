"""``train.main`` with the hooks the multi-process tests need; run it like train.py, alone or under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_train.py \
        [--record DIR] [--fail_eval] [--fail_step_on_rank R] -- <train.py arguments>

Always: training images get the test transform (resize + normalise, no random flip), so that a sample's
tensor does not depend on which process's random stream loads it and a 2-process run can be compared
number for number with a 1-process run. The rest is what train.py does.

* ``--record DIR``: each process writes ``DIR/rank<RANK>.json`` with the training-set indices it loaded, in
  order, and the torch seed it trained with (read as it asks for its first sample, before that sample's own
  seeding).
* ``--fail_eval``: evaluation raises a UserError (it runs on rank 0 only).
* ``--fail_step_on_rank R``: the model's forward raises a UserError on rank R in the second training step.
* ``--check_collectives DIR``: before training, each process runs :func:`collective_checks` on its share of
  a fixed batch and saves what it computed to ``DIR/rank<RANK>.pt`` (the test compares it with one process).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from utils.errors import UserError  # noqa: E402


DIM, ROWS, SPLIT = 8, 10, (6, 4)  # uneven shares exercise the padding of all_gather_with_grad


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image features [10, 8], text features [10, 8], person ids [10]."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(ROWS, DIM, generator=gen)
    text = torch.randn(ROWS, DIM, generator=gen)
    pids = torch.tensor([0, 1, 2, 0, 3, 1, 2, 3, 0, 4])
    return image, text, pids


def matching_losses(image, text, pids) -> dict[str, torch.Tensor]:
    from model import objectives

    return {"sdm": objectives.compute_sdm(image, text, pids, 50.0), "itc": objectives.compute_itc(image, text, 50.0),
            "cmpm": objectives.compute_cmpm(image, text, pids)}


class TwoTowers(torch.nn.Module):
    """Linear image and text towers with an identity classifier: IRRA's SDM (on the gathered batch) + ID
    (local mean) structure in small."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.image = torch.nn.Linear(DIM, DIM)
        self.text = torch.nn.Linear(DIM, DIM)
        self.classifier = torch.nn.Linear(DIM, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, image, text, pids):
        from model import objectives
        from utils import comm

        img, txt = self.image(image), self.text(text)
        sdm = objectives.compute_sdm(comm.all_gather_with_grad(img), comm.all_gather_with_grad(txt),
                                     comm.all_gather_no_grad(pids), 50.0)
        return sdm + objectives.compute_id(self.classifier(img), self.classifier(txt), pids)


def collective_checks(out_dir: str) -> None:
    """Compute, on this rank's share of :func:`fixed_batch`, what the test compares with a single process."""
    from processor.processor import RunningMeans
    from utils import comm

    env = comm.init_distributed("cpu")
    rank = env.rank
    result: dict = {"env": (env.rank, env.world_size, str(env.device)), "backend": torch.distributed.get_backend()}
    image, text, pids = fixed_batch()
    begin = sum(SPLIT[:rank])
    rows = slice(begin, begin + SPLIT[rank])
    for name in ("sdm", "itc", "cmpm"):  # each loss on the gathered features; gradients of the local rows
        img = image[rows].clone().requires_grad_()
        txt = text[rows].clone().requires_grad_()
        loss = matching_losses(comm.all_gather_with_grad(img), comm.all_gather_with_grad(txt),
                               comm.all_gather_no_grad(pids[rows]))[name]
        loss.backward()
        result[name] = (loss.detach(), img.grad, txt.grad)
    # DDP on a small model with even halves: the parameter gradients after DDP's averaging
    half = slice(rank * ROWS // 2, (rank + 1) * ROWS // 2)
    model = comm.wrap_ddp(TwoTowers(), env)
    result["wrapped"] = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    model(image[half], text[half], pids[half]).backward()
    result["ddp"] = {k: p.grad.clone() for k, p in model.module.named_parameters()}
    meters = RunningMeans()  # the means of a log line cover all ranks
    meters.update({"x_loss": torch.tensor(float(rank + 1))}, batch_size=rank + 1)
    result["means"] = meters.means()
    # a rank-0-only phase: its result reaches every rank, its UserError stops every rank
    result["made"] = comm.run_on_main(lambda: f"made by rank {rank}")

    def fail():
        raise UserError("no space left for the run folder")

    try:
        comm.run_on_main(fail)
    except UserError as err:
        result["error"] = str(err)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@contextlib.contextmanager
def hooks(record: str = "", fail_eval: bool = False, fail_step_on_rank: int = -1):
    """Apply the hooks of the module docstring for the duration of the block."""
    import datasets.build as build
    import datasets.resumable as resumable
    from model import IRRA
    from utils.metrics import Evaluator

    rank = int(os.environ.get("RANK", "0"))
    seen: list[int] = []
    seeds: list[int] = []
    original_transforms = build.build_transforms
    original_getitem = resumable.SeededSamples.__getitem__
    original_eval = Evaluator.eval
    original_forward = IRRA.forward
    steps = [0]

    def test_transforms(img_size, aug=False, is_train=True):
        return original_transforms(img_size, aug=False, is_train=False)

    def recording_getitem(self, key):
        if not seeds:
            seeds.append(torch.initial_seed())
        seen.append(int(key.index))
        return original_getitem(self, key)

    def failing_eval(self, *args, **kwargs):
        raise UserError("evaluation failed on purpose (test hook)")

    def failing_forward(self, batch):
        steps[0] += 1
        if self.training and steps[0] == 2 and rank == fail_step_on_rank:
            raise UserError(f"a training step failed on purpose on rank {rank} (test hook)")
        return original_forward(self, batch)

    build.build_transforms = test_transforms
    if record:
        resumable.SeededSamples.__getitem__ = recording_getitem
    if fail_eval:
        Evaluator.eval = failing_eval
    if fail_step_on_rank >= 0:
        IRRA.forward = failing_forward
    try:
        yield
    finally:
        build.build_transforms = original_transforms
        resumable.SeededSamples.__getitem__ = original_getitem
        Evaluator.eval = original_eval
        IRRA.forward = original_forward
        if record:
            os.makedirs(record, exist_ok=True)
            with open(os.path.join(record, f"rank{rank}.json"), "w") as handle:
                json.dump({"seed": seeds[0] if seeds else None, "indices": seen}, handle)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", default="")
    parser.add_argument("--fail_eval", action="store_true")
    parser.add_argument("--fail_step_on_rank", type=int, default=-1)
    parser.add_argument("--check_collectives", default="")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    train_args = opts.train_args[1:] if opts.train_args[:1] == ["--"] else opts.train_args
    import train

    if opts.check_collectives:
        collective_checks(opts.check_collectives)  # starts the process group train.main then uses
    with hooks(opts.record, opts.fail_eval, opts.fail_step_on_rank):
        return train.main(train_args)


if __name__ == "__main__":
    sys.exit(main())
