"""Logging set up once, by the entry point.

Library modules only call ``logging.getLogger(__name__)``. :func:`setup_logger` attaches a console handler
and, on rank 0, a file handler (``train_log.txt`` written fresh, or ``test_log.txt`` appended) to the root
logger so every module's records land in the run's log.
"""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def setup_logger(name: str = "IRRA", save_dir: str | None = None, if_train: bool = True,
                 distributed_rank: int = 0, log_file: str | None = None) -> logging.Logger:
    """Configure the root logger; returns ``logging.getLogger(name)`` for the entry point's own records.

    Non-zero ranks log warnings and errors to the console only, so a multi-process run prints one log.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_irra_handler", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.INFO if distributed_rank == 0 else logging.WARNING)
    formatter = logging.Formatter(FORMAT)

    console = logging.StreamHandler(stream=sys.stdout)
    console.setFormatter(formatter)
    console._irra_handler = True
    root.addHandler(console)

    if save_dir and distributed_rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        file_name = log_file or ("train_log.txt" if if_train else "test_log.txt")
        file_handler = logging.FileHandler(os.path.join(save_dir, file_name), mode="w" if if_train else "a")
        file_handler.setFormatter(formatter)
        file_handler._irra_handler = True
        root.addHandler(file_handler)
    # Third-party chatter that would drown the training log.
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(name)
