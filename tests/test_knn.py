"""KNN bank: faiss, IVF and torch paths against brute force."""

from __future__ import annotations

import pytest
import torch

from normscore.detectors.engines.knn import KNNBank
from normscore.errors import InputError


def _brute(bank, q, k, normalize=True):
    if normalize:
        bank = bank / bank.norm(dim=1, keepdim=True)
        q = q / q.norm(dim=1, keepdim=True)
    return torch.cdist(q.double(), bank.double()).sort(dim=1).values[:, k - 1]


@pytest.mark.parametrize("normalize", [True, False])
def test_flat_index_equals_brute_force(normalize):
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(3000, 16, generator=g), torch.randn(50, 16, generator=g)
    kb = KNNBank(normalize=normalize)
    for i in range(0, 3000, 700):
        kb.add(bank[i : i + 700])
    for k in (1, 5, 50):
        assert torch.allclose(kb.kth_distance(q, k).double(), _brute(bank, q, k, normalize), atol=1e-4)


def test_torch_path_and_float16_storage_agree():
    g = torch.Generator().manual_seed(1)
    bank, q = torch.randn(5000, 8, generator=g), torch.randn(20, 8, generator=g)
    kb = KNNBank()
    kb.add(bank)
    kb.build()
    d, _ = kb._torch_search(KNNBank._prep(q, True), 7, chunk=999)
    assert torch.allclose(d[:, 6].double(), _brute(bank, q, 7), atol=1e-4)
    half = KNNBank(storage_dtype=torch.float16)
    half.add(bank)
    assert half.bank is None and half._parts[0].dtype == torch.float16
    assert torch.allclose(half.kth_distance(q, 7).double(), _brute(bank, q, 7), atol=2e-3)


def test_ivf_is_close_to_exact():
    g = torch.Generator().manual_seed(2)
    bank, q = torch.randn(20000, 16, generator=g), torch.randn(100, 16, generator=g)
    kb = KNNBank(index="ivf", nprobe=64)
    kb.add(bank)
    exact = _brute(bank, q, 5)
    assert (kb.kth_distance(q, 5).double() - exact).abs().mean() < 0.02


def test_k_larger_than_bank_and_empty_bank():
    kb = KNNBank()
    with pytest.raises(InputError, match="empty"):
        kb.build()
    kb.add(torch.randn(3, 4))
    with pytest.raises(InputError, match="only 3 vectors"):
        kb.kth_distance(torch.randn(2, 4), 5)
