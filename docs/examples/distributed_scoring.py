"""Example 2: multi-process batch scoring with torch.distributed and a DistributedSampler.

Each process loads the model and the saved detector, scores its shard of the dataset, and the
scores are gathered on rank 0 in dataset order. Uses the gloo backend, so it runs on CPUs.
Run: python docs/examples/distributed_scoring.py  (spawns 2 processes)
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normscore
from normscore.data import get_dataset
from normscore.models import small_cnn
from normscore.pipeline import score_loader
from normscore.training import train_classifier

WORLD = 2


def prepare(workdir: str) -> None:
    """Train a model and fit + save a detector (normally done once, offline)."""
    torch.manual_seed(0)
    train = get_dataset("fashion-mnist", "train", limit=4000)
    model = train_classifier(small_cnn(width=16), train, epochs=1, progress=False)
    torch.save(model.state_dict(), os.path.join(workdir, "model.pt"))
    det = normscore.DetectorSet(["msp", "energy", "penultimate_norm"])
    det.fit(model, torch.utils.data.DataLoader(train, batch_size=256))
    det.save(os.path.join(workdir, "detector.ns"))


def worker(rank: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("EXAMPLE_PORT", "29517"))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = small_cnn(width=16)
    model.load_state_dict(torch.load(os.path.join(workdir, "model.pt"), weights_only=True))
    det = normscore.load(os.path.join(workdir, "detector.ns"), model=model.eval())

    data = get_dataset("fashion-mnist", "test", limit=1000)
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=100, sampler=sampler)
    scores = score_loader(det, loader, progress=False)  # {"msp": [n_rank], ...}
    index = torch.tensor(list(iter(sampler)))

    gathered = [None] * WORLD
    dist.all_gather_object(gathered, (index, scores))
    if rank == 0:
        n = len(data)
        full = {k: torch.empty(n) for k in scores}
        for idx, s in gathered:
            for k, v in s.items():
                full[k][idx] = v
        torch.save(full, os.path.join(workdir, "scores.pt"))
        print({k: round(float(v.mean()), 4) for k, v in full.items()}, "for", n, "images on", WORLD, "processes")
    dist.destroy_process_group()


if __name__ == "__main__":
    workdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="normscore-dist-")
    if not os.path.exists(os.path.join(workdir, "detector.ns")):
        prepare(workdir)
    mp.spawn(worker, args=(workdir,), nprocs=WORLD, join=True)
