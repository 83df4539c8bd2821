"""torchrun worker: VTC gradients of a 2-rank gloo run must equal the single-process gradients.

Every rank builds the same global batch and the same projection weights, runs its half of the batch through the
projections, computes the VTC loss (gather_with_grad), averages the parameter gradients over ranks as DDP does, and
compares them with the one-process gradient of the full batch.
"""

import sys

import torch
import torch.distributed as dist

from stmvl.models.losses import vtc_loss


def projections():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 5), torch.nn.Linear(7, 5)


def loss_of(video_proj, text_proj, video, text, ids, gather):
    return vtc_loss(video_proj(video), text_proj(text), ids, 0.1, gather=gather)


def grads(*modules):
    return torch.cat([p.grad.flatten() for m in modules for p in m.parameters()])


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    video = torch.randn(8, 3, 6, generator=g)  # 8 clips, 3 frames each
    text = torch.randn(8, 7, generator=g)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5])  # duplicates across the rank boundary too
    ids[4] = 1

    vp, tp = projections()
    loss_of(vp, tp, video, text, ids, gather=False).backward()
    reference = grads(vp, tp)

    vp, tp = projections()
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = loss_of(vp, tp, video[local], text[local], ids[local], gather=True)
    loss.backward()
    distributed = grads(vp, tp)
    dist.all_reduce(distributed)
    distributed /= world  # DDP's gradient averaging
    err = (distributed - reference).abs().max().item()
    print(f"rank {rank}: max |grad diff| = {err:.3e}", flush=True)
    dist.destroy_process_group()
    return 0 if err < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
