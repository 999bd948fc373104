"""Run under torchrun by test_distill_ddp.py: a few distillation steps with DDP on gloo."""

from __future__ import annotations

import hashlib
import sys

import torch
import torch.distributed as dist

from fxslim.passes.distill import distill
from fxslim.runtime.examples import DigitsResNet, digits_loaders


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    train, _val = digits_loaders(batch_size=64, seed=0)
    teacher = DigitsResNet(width=16).eval()
    torch.manual_seed(1)
    student = DigitsResNet(width=8)  # the same initial weights on every rank (seeded)
    distill(student, teacher, train, None, epochs=2, progress=False, checkpoint_dir=out, seed=0)
    blob = b"".join(t.detach().contiguous().numpy().tobytes() for t in student.state_dict().values())
    print(f"RANK {rank} WORLD {dist.get_world_size()} WEIGHTS {hashlib.sha256(blob).hexdigest()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
