import os
import sys
import tempfile

# Set before torch starts OpenMP (and inherited by the train.py/torchrun subprocesses some tests launch):
# spinning OpenMP threads make small CPU workloads several times slower on shared 2-core machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Nothing is downloaded in tests, and nothing is left in the user's cache folder (caption caches, vocabularies).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="tpr-test-cache-")

# Tests import the project's packages from the repository root, as the entry points do.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest
import torch

from utils.logger import remove_handlers


@pytest.fixture(autouse=True)
def single_thread():
    """Tests use tiny models: one thread is fastest for them and leaves the other core to loader workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """Entry points called in-process attach console and file handlers to the root logger; remove them after
    each test, so that no later test logs into a closed capture stream or another test's run folder."""
    yield
    remove_handlers()
