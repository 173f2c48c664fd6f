"""Example 1: a plain PyTorch inference loop with an OOD gate.

Train (or load) a classifier, fit an OOD detector on ID training data, wrap both in a
ScoringModule, and in the serving loop accept only predictions whose input scores as
in-distribution. Run: python docs/examples/inference_gate.py
"""

import torch

import normscore
from normscore.data import get_dataset
from normscore.models import small_cnn
from normscore.pipeline import ScoringModule
from normscore.training import train_classifier

torch.manual_seed(0)
train = get_dataset("fashion-mnist", "train", limit=6000)
model = train_classifier(small_cnn(width=16), train, epochs=1, progress=False)

# 1. fit the detector on ID training data (every 10th sample is held out to set the threshold)
loader = torch.utils.data.DataLoader(train, batch_size=256)
detector = normscore.create("mahalanobis").fit(model, loader)  # class-conditional: uses the labels
gate = ScoringModule(model, detector).eval()
threshold = detector.decision.threshold  # keeps 95% of held-out ID inputs

# 2. the serving loop: one forward pass gives the prediction and the OOD score
incoming = [
    ("fashion", get_dataset("fashion-mnist", "test", limit=256)),
    ("digits (OOD)", get_dataset("mnist-5k", limit=256)),
]
for name, stream in incoming:
    accepted = total = 0
    with torch.inference_mode():
        for x, _ in torch.utils.data.DataLoader(stream, batch_size=64):
            logits, score = gate(x)
            ok = score >= threshold  # False = OOD: route to a human / fallback instead
            prediction = logits.argmax(1)[ok]
            accepted += int(ok.sum())
            total += len(x)
    print(
        f"{name:14s} accepted {accepted}/{total} ({accepted / total:.0%}), e.g. predictions {prediction[:5].tolist()}"
    )
