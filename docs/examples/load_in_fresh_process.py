"""Example 3: save a fitted detector, then load it in a fresh process next to the model.

The saved file holds tensors and JSON only (no pickle); loading refuses anything else.
Run: python docs/examples/load_in_fresh_process.py
"""

import os
import subprocess
import sys
import tempfile

import torch

import normscore
from normscore.data import get_dataset
from normscore.models import small_cnn
from normscore.training import train_classifier

SERVE = r"""
import sys, torch, normscore
from normscore.models import small_cnn
workdir = sys.argv[1]
model = small_cnn(width=16)
model.load_state_dict(torch.load(f"{workdir}/model.pt", weights_only=True))
detector = normscore.load(f"{workdir}/knn.ns", model=model.eval())
x = torch.load(f"{workdir}/batch.pt", weights_only=True)
torch.save(detector.score(x), f"{workdir}/served_scores.pt")
print("fresh process:", detector, "threshold", round(detector.decision.threshold, 4))
"""

if __name__ == "__main__":
    torch.manual_seed(0)
    train = get_dataset("fashion-mnist", "train", limit=4000)
    model = train_classifier(small_cnn(width=16), train, epochs=1, progress=False)
    detector = normscore.create("knn").fit(model, torch.utils.data.DataLoader(train, batch_size=256))
    x = torch.stack([get_dataset("fashion-mnist", "test", limit=32)[i][0] for i in range(32)])

    with tempfile.TemporaryDirectory(prefix="normscore-serve-") as workdir:
        torch.save(model.state_dict(), os.path.join(workdir, "model.pt"))
        detector.save(os.path.join(workdir, "knn.ns"))
        torch.save(x, os.path.join(workdir, "batch.pt"))

        subprocess.run([sys.executable, "-c", SERVE, workdir], check=True)
        served = torch.load(os.path.join(workdir, "served_scores.pt"), weights_only=True)
    here = detector.score(x)
    assert torch.equal(served, here), "scores differ between processes"
    print(f"knn: identical scores in the fresh process for {len(x)} images")
