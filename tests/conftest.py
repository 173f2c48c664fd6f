import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # tests use tiny tensors: one thread is fastest and avoids oversubscription

from helpers import TinyCNN, make_loader  # noqa: E402


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    m = TinyCNN()
    # give BN non-trivial running statistics
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return m.eval()


@pytest.fixture
def resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10).eval()


@pytest.fixture
def loader():
    return make_loader()
