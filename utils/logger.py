"""Logging set up once, by the entry point.

Library modules only call ``logging.getLogger(__name__)``. :func:`setup_logger` attaches a console handler
and, on rank 0, a file handler (``train_log.txt`` written fresh, or ``test_log.txt`` appended) to the root
logger so every module's records land in the run's log. Training checks its input before it makes the run
folder: ``setup_logger(buffer=True)`` keeps the records of that phase and :func:`attach_log_file` writes them
at the top of the log once the folder exists.
"""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class _Buffer(logging.Handler):
    """Keeps records until a log file exists (see :func:`attach_log_file`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_logger(name: str = "IRRA", save_dir: str | None = None, if_train: bool = True,
                 distributed_rank: int = 0, log_file: str | None = None, buffer: bool = False) -> logging.Logger:
    """Configure the root logger; returns ``logging.getLogger(name)`` for the entry point's own records.

    Non-zero ranks log warnings and errors to the console only, so a multi-process run prints one log. With
    ``buffer`` the records are also kept for :func:`attach_log_file`.
    """
    remove_handlers()
    root = logging.getLogger()
    root.setLevel(logging.INFO if distributed_rank == 0 else logging.WARNING)
    formatter = logging.Formatter(FORMAT)

    console = logging.StreamHandler(stream=sys.stdout)
    console.setFormatter(formatter)
    console._irra_handler = True
    root.addHandler(console)

    if buffer:
        keeper = _Buffer()
        keeper._irra_handler = True
        root.addHandler(keeper)
    if save_dir and distributed_rank == 0:
        attach_log_file(save_dir, log_file or ("train_log.txt" if if_train else "test_log.txt"),
                        mode="w" if if_train else "a")
    # Third-party chatter that would drown the training log.
    for noisy in ("PIL", "matplotlib", "urllib3"):  # third-party chatter that would drown the training log
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # no bold CJK face: regular is used
    return logging.getLogger(name)


def remove_handlers() -> None:
    """Close and remove every handler :func:`setup_logger` and :func:`attach_log_file` added."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_irra_handler", False):
            root.removeHandler(handler)
            handler.close()


def attach_log_file(save_dir: str, file_name: str = "train_log.txt", mode: str = "w") -> str:
    """Send the root logger's records to ``save_dir/file_name`` too, starting with those buffered since
    ``setup_logger(buffer=True)`` (the buffer then stops). Returns the file's path."""
    root = logging.getLogger()
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, file_name)
    file_handler = logging.FileHandler(path, mode=mode)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler._irra_handler = True
    for handler in list(root.handlers):
        if isinstance(handler, _Buffer):
            root.removeHandler(handler)
            for record in handler.records:
                file_handler.handle(record)
    root.addHandler(file_handler)
    return path


def detach_log_files() -> None:
    """Close and remove every log file handler this module added (before a run folder is deleted)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_irra_handler", False) and isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
