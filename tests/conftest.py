"""Shared fixtures. Tests run on CPU with the `tiny` preset and never touch the network."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pytest.ini runs the suite in two worker processes (pytest-xdist, one test file per worker at a
# time): much of a test's time is single-threaded (imports, subprocesses starting up), so two
# workers keep two cores busy. Each worker then gets one thread, and so do the processes its
# tests start: two processes with two threads each on two cores run many times slower.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if WORKERS > 1 else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """tiny components with the dual-path processors installed, and the LoRA layer names."""
    import dualpath
    import model

    comps = model.load_components("tiny")
    names = dualpath.install_dual_path(comps.unet)
    return comps, names


@pytest.fixture(scope="session")
def sd15_meta():
    import model

    return model.load_components("sd15-arch", device="meta")
