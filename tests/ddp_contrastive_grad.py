"""Helper for test_experiments.py (not a test itself): the encoder gradient of Eq. (3) under DDP.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_contrastive_grad.py OUT.pt

Each of the 2 ranks takes 2 of the same 4 seeded inputs; rank 0 saves the DDP-averaged gradient
of the weighted contrastive term. Run with 1 process it uses all 4 (see contrastive_grads).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import dualpath  # noqa: E402
import model  # noqa: E402
import pretrain  # noqa: E402

N_IMAGES = 4


def contrastive_grads(world: int = 1, rank: int = 0) -> dict:
    """{parameter name: gradient} of lambda_c * Eq. (3) for this rank's share of the 4 inputs."""
    comps = model.load_components("tiny", with_image_encoder=False)
    names = dualpath.install_dual_path(comps.unet)
    torch.manual_seed(0)
    enc = model.TuningEncoder(comps.cfg, 64, 64, names, model.lora_shapes(comps.unet, names),
                              token_norm=model.typical_token_norm(comps.token_table))
    g = torch.Generator().manual_seed(1)
    clip_map, unet_map = torch.randn(N_IMAGES, 64, 7, 7, generator=g), torch.randn(N_IMAGES, 64, 8, 8, generator=g)
    share = N_IMAGES // world
    mine = slice(rank * share, (rank + 1) * share)
    net = DDP(enc, find_unused_parameters=True) if world > 1 else enc  # the hypernetwork heads get no gradient here
    v, _ = net(clip_map[mine], unet_map[mine])
    cfg = pretrain.Config(embedding_reg="contrastive")
    term, weight = pretrain.embedding_terms(cfg, v, comps.token_table, world, rank)["contrastive"]
    (weight * term).backward()
    return {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        grads = contrastive_grads(dist.get_world_size(), dist.get_rank())
        if dist.get_rank() == 0:
            torch.save(grads, sys.argv[1])
    finally:
        dist.destroy_process_group()
