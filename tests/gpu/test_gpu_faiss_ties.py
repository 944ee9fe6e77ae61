"""faiss's GPU index and the torch search on the GPU rank exact ties the same way: by similarity, then by
gallery index (bench.metrics' tie rule), whatever order faiss returns tied items in."""

from __future__ import annotations

import pytest
import torch

from bench.metrics import knn, retrieval_metrics

pytestmark = pytest.mark.gpu


def test_faiss_gpu_and_torch_agree_on_ties():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss without GPU support (the gpu extra installs faiss-gpu)")
    gen = torch.Generator().manual_seed(0)
    distinct = torch.nn.functional.normalize(torch.randn(500, 64, generator=gen), dim=1)
    emb = distinct[torch.randint(0, 500, (4000,), generator=gen)].cuda()  # every row has exact duplicates
    labels = torch.randint(0, 50, (4000,), generator=gen).numpy()
    results = {
        backend: knn(emb, None, 20, exclude_self=True, backend=backend) for backend in ("faiss", "torch")
    }
    sims = {backend: s.cpu() for backend, (s, _) in results.items()}
    ids = {backend: i.cpu() for backend, (_, i) in results.items()}
    torch.testing.assert_close(sims["faiss"], sims["torch"], rtol=0, atol=1e-5)
    assert torch.equal(ids["faiss"], ids["torch"])
    metrics = {b: retrieval_metrics(emb, labels, backend=b) for b in ("faiss", "torch")}
    assert metrics["faiss"] == metrics["torch"]
