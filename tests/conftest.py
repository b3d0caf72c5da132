"""Shared fixtures. Tests run on CPU with the `tiny` preset and never touch the network."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


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
