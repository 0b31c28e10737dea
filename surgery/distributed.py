"""Calibration across processes on PyTorch's own stack: `torchrun --nproc-per-node N -m surgery calibrate ...`.

torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) gives the process group: gloo on CPU,
nccl on CUDA. Student and teacher are sharded with FSDP2 (`fully_shard` per decoder layer, then the root);
every rank draws the same window order and takes its contiguous slice of each global batch, so with a
mean-over-tokens loss and FSDP's gradient mean the update equals the single-process one at the same global
batch. Checkpoints go through torch.distributed.checkpoint (each rank writes its shards); the final model is
gathered into a full state dict on rank 0, the only rank that logs or writes anything else.

Without torchrun (WORLD_SIZE unset or 1) nothing here runs and calibration is the single-process code path.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

from surgery.atomic import atomic_file
from surgery.calibrate import trained_keys
from surgery.errors import SurgeryError

# Rank 0 may gather and write a large model while the others wait in a collective: be patient.
TIMEOUT = timedelta(hours=2)


def env_rank() -> int:
    """This process's rank under torchrun (0 without it): decides who logs, before and after the group."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- sharding and the rank's share of a batch --------------------------------------------------------

    def shard(self, model) -> None:
        """FSDP2: one unit per decoder layer (its weights gathered only while it runs), then the root
        (embeddings, final norm, head). Call after setting requires_grad: FSDP fixes it per parameter."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise SurgeryError(f"--batch-size {batch_size}: not divisible by the {self.world} processes "
                               f"(each takes an equal share of the global batch)")

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global batch (rank 0 the first windows)."""
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, values: list[float]) -> list[float]:
        """Mean over ranks of per-rank means over equal token counts: the global batch's mean."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return (t / self.world).tolist()

    @torch.no_grad()
    def broadcast_from_main(self, tensors) -> None:
        """Make rank 0's values everyone's (after the layer-wise stage, which every rank runs in full)."""
        for t in tensors:
            tdist.broadcast(t.data, 0)

    # ---- checkpoints and the final state ------------------------------------------------------------------

    def full_state(self, model) -> dict:
        """The whole model's full tensors on rank 0's CPU ({} elsewhere); a collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def barrier(self) -> None:
        tdist.barrier()

    def close(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def from_env(device: str) -> Dist | None:
    """The process group torchrun asked for, or None when this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise SurgeryError("WORLD_SIZE is set but RANK or MASTER_ADDR is not: start with torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise SurgeryError(f"--device {device}: under torchrun choose cpu (gloo) or cuda (nccl)")
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=TIMEOUT, **({"device_id": dev} if dev.type == "cuda" else {}))
    return Dist(rank, world, local, dev)


# ---- distributed checkpoints (torch.distributed.checkpoint) ------------------------------------------------
# A checkpoint folder holds ckpt.pt (the run state, rng and the name of the current DCP folder) and that
# folder (dcp-<step>/, each rank's shards of the trained weights and optimizer state). A new DCP folder is
# complete before ckpt.pt points at it, so a kill at any moment leaves the previous checkpoint usable.

def save_checkpoint(folder: Path, state: dict, model, optimizer, all_layers: bool, dist: Dist) -> None:
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    name = f"dcp-{state['step']:06d}"
    tmp = folder / f"{name}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": trained_keys(model, msd, all_layers), "optim": osd}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.main:
        shutil.rmtree(folder / name, ignore_errors=True)
        tmp.rename(folder / name)
        blob = {"state": state, "dcp": name, "world": dist.world, "rng": torch.get_rng_state()}
        with atomic_file(folder / "ckpt.pt") as f:
            torch.save(blob, f)
        (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        for old in folder.glob("dcp-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(folder: Path, blob: dict, model, optimizer, all_layers: bool) -> None:
    """Load a DCP checkpoint into `model` and `optimizer`, sharded or not, at any world size (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = Path(folder) / blob["dcp"]
    if not path.is_dir():
        raise SurgeryError(f"{path}: distributed checkpoint folder is missing (named in {folder}/ckpt.pt)")
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": trained_keys(model, msd, all_layers), "optim": osd}
    dcp.load(sd, checkpoint_id=str(path), no_dist=not tdist.is_initialized())  # 1 process: no group needed
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=StateDictOptions(strict=False))
