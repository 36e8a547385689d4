"""Run by test_meta under torchrun: a tiny meta-training on this rank, then this rank's weights and losses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from meta_helpers import DDP_SETTINGS, own_state, tiny_run  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = tiny_run(out / "ckpt", **DDP_SETTINGS)
    torch.save(own_state(result), out / f"rank{rank}.pt")
    (out / f"loss{rank}.json").write_text(json.dumps([r["loss"] for r in result.log]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
