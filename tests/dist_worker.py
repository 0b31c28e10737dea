"""A torchrun worker for tests/test_distributed.py: end-to-end calibration of a tiny converted model across
processes (surgery.calibrate.calibrate with a surgery.distributed.Dist). --copy-at STEP copies the checkpoint
folder aside right after step STEP's checkpoint (what a kill at that moment would leave on disk); --resume
continues from a checkpoint folder."""

import argparse
import json
import shutil
from pathlib import Path

import torch

import surgery
import surgery.distributed as sdist
from surgery.calibrate import CalibrateConfig, calibrate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--config", required=True, help="CalibrateConfig as JSON")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default=None, help="torch.save the full state and history here (rank 0)")
    ap.add_argument("--copy-at", type=int, default=0)
    ap.add_argument("--copy-to", default=None)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    dist = sdist.from_env("cpu")
    assert dist is not None and dist.world == 2
    teacher, student = surgery.load(a.teacher), surgery.load(a.student)
    cfg = CalibrateConfig.from_dict(json.loads(a.config))
    if a.copy_at:
        real = sdist.save_checkpoint

        def save_then_copy(folder, state, *args, **kw):
            real(folder, state, *args, **kw)  # returns after its last barrier: the folder is complete
            if state["step"] == a.copy_at and dist.main:
                shutil.copytree(folder, a.copy_to)
            dist.barrier()

        sdist.save_checkpoint = save_then_copy
    try:
        res = calibrate(student, teacher, None, cfg, Path(a.ckpt), a.resume, progress=False,
                        ids=torch.load(a.ids), dist=dist)
        state = dist.full_state(student)
        if dist.main and a.out:
            torch.save({"state": state, "history": res["e2e"]["history"]}, a.out)
        # both ranks tear gloo down together: once in five CI runs (round 20) rank 1 aborted in its teardown
        # ("terminate called without an active exception") while rank 0 was still writing
        dist.barrier()
    finally:
        dist.close()


if __name__ == "__main__":
    main()
