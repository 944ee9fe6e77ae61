"""bench.metrics against float64 brute force, hand-worked examples and pytorch-metric-learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

import bench.metrics as metrics_module
from bench.benchmarks.eval_bench import (
    SHARED_METRICS,
    SOP_TEST,
    EvalData,
    Placement,
    class_sizes,
    format_table,
    parse_placements,
    run_eval_bench,
)
from bench.metrics import knn, retrieval_metrics, search_engine
from tests.helpers import clustered

BACKENDS = ["faiss", "torch"]
SMALL = EvalData(
    n=600, n_classes=110, max_class_size=SOP_TEST.max_class_size, dim=32
)  # the bench's smoke size
KS = (1, 2, 4, 8, 1000)  # 1000 > every test gallery: "all candidates"


def ranking(sims: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates by similarity descending, then gallery index ascending (the documented tie rule)."""
    return candidates[np.lexsort((candidates, -sims[candidates]))]


def brute_force(q, q_labels, g=None, g_labels=None, ks=KS) -> dict[str, float]:
    """Musgrave et al.'s definitions, one query at a time, in float64 with a full sort."""
    leave_one_out = g is None
    if leave_one_out:
        g, g_labels = q, q_labels
    q64, g64 = np.asarray(q, np.float32).astype(np.float64), np.asarray(g, np.float32).astype(np.float64)
    totals = dict.fromkeys([f"recall_at_{k}" for k in ks] + ["map_at_r", "r_precision"], 0.0)
    evaluated = 0
    for i in range(len(q64)):
        candidates = np.arange(len(g64))
        if leave_one_out:
            candidates = candidates[candidates != i]
        rel = g_labels[ranking(g64 @ q64[i], candidates)] == q_labels[i]
        r = int(rel.sum())
        if r == 0:
            continue
        evaluated += 1
        for k in ks:
            totals[f"recall_at_{k}"] += float(rel[:k].any())
        totals["r_precision"] += rel[:r].sum() / r
        totals["map_at_r"] += sum(rel[:i].sum() / i for i in range(1, r + 1) if rel[i - 1]) / r
    return {key: value / evaluated for key, value in totals.items()}


def quantised(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Values in {-1, -0.5, 0, 0.5, 1}: float32 inner products are exact, so ties are exact and plentiful."""
    return rng.integers(-2, 3, size=(n, dim)).astype(np.float32) / 2


def labels_with_singletons(rng: np.random.Generator, n: int, n_classes: int, singletons: int) -> np.ndarray:
    """Labels in [0, n_classes) plus `singletons` classes with exactly one item each."""
    labels = rng.integers(0, n_classes, size=n)
    labels[rng.choice(n, singletons, replace=False)] = n_classes + np.arange(singletons)
    return labels


# ------------------------------------------------------------------------------------------ brute force


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_leave_one_out_with_ties_matches_brute_force(backend, chunk_size):
    rng = np.random.default_rng(1)
    x = quantised(rng, 300, 5)  # 3,125 distinct vectors for 300 items: many duplicates and equal similarities
    y = labels_with_singletons(rng, 300, 40, singletons=15)
    got = retrieval_metrics(x, y, ks=KS, backend=backend, chunk_size=chunk_size)
    assert got == pytest.approx(brute_force(x, y), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_gallery_with_ties_and_absent_classes_matches_brute_force(backend):
    rng = np.random.default_rng(2)
    q, g = quantised(rng, 120, 4), quantised(rng, 250, 4)
    q_labels = rng.integers(0, 30, size=120)  # classes 25..29 never occur in the gallery: R = 0
    g_labels = rng.integers(0, 25, size=250)
    got = retrieval_metrics(
        torch.from_numpy(q), torch.from_numpy(q_labels), g, g_labels, ks=KS, backend=backend
    )
    assert got == pytest.approx(brute_force(q, q_labels, g, g_labels), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_embeddings_match_brute_force(backend):
    rng = np.random.default_rng(3)
    y = labels_with_singletons(rng, 400, 50, singletons=10)
    x = clustered(rng, y, 16)
    expected = brute_force(x, y)
    assert 0.2 < expected["map_at_r"] < 0.9  # the data are informative, not a trivial 0 or 1
    assert retrieval_metrics(x, y, ks=KS, backend=backend) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_class_needs_more_neighbours_than_ks(backend):
    """R = 59 for one class: the search must go to the R-th neighbour, not stop at max(ks)."""
    rng = np.random.default_rng(4)
    y = np.concatenate([np.zeros(60, np.int64), rng.integers(1, 20, size=140)])
    x = quantised(rng, 200, 6)
    got = retrieval_metrics(x, y, ks=(1, 2), backend=backend, chunk_size=50)
    assert got == pytest.approx(brute_force(x, y, ks=(1, 2)), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_matches_brute_force_ranking(backend):
    rng = np.random.default_rng(5)
    x = quantised(rng, 150, 3)  # 125 distinct vectors: exact duplicates everywhere
    sims, ids = knn(x, None, 20, exclude_self=True, backend=backend, chunk_size=16)
    full = x.astype(np.float64) @ x.T.astype(np.float64)
    for i in range(len(x)):
        expected = ranking(full[i], np.delete(np.arange(len(x)), i))[:20]
        np.testing.assert_array_equal(ids[i].numpy(), expected)
        np.testing.assert_array_equal(sims[i].numpy(), full[i, expected])


# ------------------------------------------------------------------------------------------ hand-worked


def unit(deg: float) -> list[float]:
    return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_leave_one_out(backend):
    # Unit vectors at 0, 10, 25, 90, 100 degrees, labels 0, 0, 1, 1, 0; similarity falls with the angle.
    # q0 (L0): ranks 1(10), 2(25), 3(90), 4(100) -> rel 1,0,0,1; R=2: R-prec 1/2, MAP@R (1+0)/2 = 1/2.
    # q1 (L0): ranks 0(10), 2(15), 3(80), 4(90)  -> rel 1,0,0,1; R=2: R-prec 1/2, MAP@R 1/2.
    # q2 (L1): ranks 1(15), 0(25), 3(65), 4(75)  -> rel 0,0,1,0; R=1: R-prec 0, MAP@R 0, hit only at 4.
    # q3 (L1): ranks 4(10), 2(65), 1(80), 0(90)  -> rel 0,1,0,0; R=1: R-prec 0, MAP@R 0, hit at 2.
    # q4 (L0): ranks 3(10), 2(25), 1(90), 0(100) -> rel 0,0,1,1; R=2: R-prec 0, MAP@R 0, hit at 4.
    # recall@1 = 2/5, recall@2 = 3/5, recall@4 = 5/5, R-precision = 1/5, MAP@R = 1/5.
    x = np.array([unit(a) for a in (0, 10, 25, 90, 100)], np.float32)
    y = np.array([0, 0, 1, 1, 0])
    got = retrieval_metrics(x, y, ks=(1, 2, 4), backend=backend)
    expected = {
        "recall_at_1": 0.4,
        "recall_at_2": 0.6,
        "recall_at_4": 1.0,
        "r_precision": 0.2,
        "map_at_r": 0.2,
    }
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_query_gallery_with_absent_class(backend):
    # Gallery at 10, 20, 30, 40, 50 degrees with labels 7, 3, 7, 7, 3.
    # Query at 0 (L7): rel 1,0,1,1,0; R=3: R-prec 2/3; MAP@R (1/1 + 0 + 2/3)/3 = 5/9.
    # Query at 60 (L3): order 50, 40, 30, 20, 10 -> rel 1,0,0,1,0; R=2: R-prec 1/2; MAP@R (1 + 0)/2 = 1/2.
    # Query at 5 (L9): no item of class 9 in the gallery (R=0): left out of every average.
    # recall@1 = recall@2 = 1; R-precision = (2/3 + 1/2)/2 = 7/12; MAP@R = (5/9 + 1/2)/2 = 19/36.
    gallery = np.array([unit(a) for a in (10, 20, 30, 40, 50)], np.float32)
    query = np.array([unit(a) for a in (0, 60, 5)], np.float32)
    got = retrieval_metrics(query, [7, 3, 9], gallery, np.array([7, 3, 7, 7, 3]), ks=(1, 2), backend=backend)
    expected = {"recall_at_1": 1.0, "recall_at_2": 1.0, "r_precision": 7 / 12, "map_at_r": 19 / 36}
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_ties_break_by_gallery_index(backend):
    # Query [1, 0] (L1); gallery g0=[0,1] L1 (sim 0), g1=g2=g3=[1,0] with labels 0, 1, 0 (sim 1, tied).
    # Tie rule: g1, g2, g3, then g0 -> rel 0,1,0,1; R=2: recall@1 0, recall@2 1, R-prec 1/2, MAP@R (0+1/2)/2.
    gallery = np.array([[0, 1], [1, 0], [1, 0], [1, 0]], np.float32)
    got = retrieval_metrics(
        np.array([[1, 0]], np.float32), [1], gallery, [1, 0, 1, 0], ks=(1, 2), backend=backend
    )
    assert got == pytest.approx(
        {"recall_at_1": 0.0, "recall_at_2": 1.0, "r_precision": 0.5, "map_at_r": 0.25}
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_duplicates_of_the_query_still_count(backend):
    # 0=[1,0] L0, 1=[1,0] L0 (duplicate), 2=[.8,.6] L1, 3=[.8,.6] L1 (duplicate), 4=[0,1] L0,
    # 5=[-1,0] L9 (alone).
    # q0: 1(1) 2(.8) 3(.8) 4(0) 5(-1) -> rel 1,0,0,1; R=2: recall@1 1, R-prec 1/2, MAP@R 1/2. q1 likewise.
    # q2: 3(1) 0(.8) 1(.8) 4(.6) 5(-.8) -> rel 1,0,0,0; R=1: all 1. q3 likewise.
    # q4: 2(.6) 3(.6) 0(0) 1(0) 5(0) -> rel 0,0,1,1; R=2: recall@1 = recall@2 = 0, recall@4 = 1, R-prec 0,
    # MAP@R 0.
    # q5: R=0, left out. recall@1 = recall@2 = 4/5, recall@4 = 1, R-precision = MAP@R = 3/5.
    # Removing the query by distance instead of index would drop the duplicates and lower recall@1.
    x = np.array([[1, 0], [1, 0], [0.8, 0.6], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)
    got = retrieval_metrics(x, np.array([0, 0, 1, 1, 0, 9]), ks=(1, 2, 4), backend=backend)
    expected = {
        "recall_at_1": 0.8,
        "recall_at_2": 0.8,
        "recall_at_4": 1.0,
        "r_precision": 0.6,
        "map_at_r": 0.6,
    }
    assert got == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------ PML


def pml(q, q_labels, g=None, g_labels=None) -> dict[str, float]:
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    return calculator.get_accuracy(q, q_labels, g, g_labels, ref_includes_query=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_pytorch_metric_learning_leave_one_out(backend):
    rng = np.random.default_rng(6)
    y = labels_with_singletons(rng, 500, 60, singletons=20)
    x = clustered(rng, y, 32)
    ours, theirs = retrieval_metrics(x, y, backend=backend), pml(x, y)
    assert ours["recall_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_pytorch_metric_learning_query_gallery(backend):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 40, size=600)
    x = clustered(rng, labels, 32)
    q, g = x[:200], x[200:]
    q_labels, g_labels = labels[:200], np.where(labels[200:] < 35, labels[200:], 0)  # classes 35+: R = 0
    ours, theirs = retrieval_metrics(q, q_labels, g, g_labels, backend=backend), pml(q, q_labels, g, g_labels)
    assert ours["recall_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)


# ------------------------------------------------------------------------------------------ backends, errors


def test_without_faiss_auto_falls_back_to_torch(monkeypatch):
    rng = np.random.default_rng(8)
    y = rng.integers(0, 10, size=80)
    x = clustered(rng, y, 8)
    monkeypatch.setattr(metrics_module, "faiss", None)
    assert retrieval_metrics(x, y) == pytest.approx(brute_force(x, y, ks=(1, 2, 4, 8)), abs=1e-12)
    with pytest.raises(ImportError, match="faiss is not installed"):
        retrieval_metrics(x, y, backend="faiss")


@pytest.mark.parametrize(
    ("backend", "on_cuda", "faiss_gpus", "engine"),
    [
        ("auto", False, 0, "faiss-cpu"),
        ("auto", False, 1, "faiss-cpu"),  # CPU embeddings are searched on the CPU, faiss-gpu or not
        ("auto", True, 0, "torch"),  # CUDA embeddings without faiss-gpu: the torch search, on that GPU
        ("auto", True, 1, "faiss-gpu"),
        ("faiss", False, 1, "faiss-cpu"),
        ("faiss", True, 0, "faiss-cpu"),  # asked for faiss, which has no GPU: faiss on the CPU
        ("faiss", True, 1, "faiss-gpu"),
        ("torch", False, 1, "torch"),
        ("torch", True, 1, "torch"),
    ],
)
def test_the_search_runs_where_the_embeddings_are(monkeypatch, backend, on_cuda, faiss_gpus, engine):
    monkeypatch.setattr(metrics_module.faiss, "get_num_gpus", lambda: faiss_gpus)
    assert search_engine(backend, on_cuda) == engine


def test_cpu_embeddings_never_go_to_a_faiss_gpu(monkeypatch):
    def no_gpu_index(index):
        raise AssertionError("CPU embeddings were sent to a faiss GPU index")

    monkeypatch.setattr(metrics_module.faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(metrics_module.faiss, "index_cpu_to_all_gpus", no_gpu_index)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, size=80)
    x = clustered(rng, y, 8)
    for data in (x, torch.from_numpy(x)):
        got = retrieval_metrics(data, y, backend="faiss")
        assert got == pytest.approx(brute_force(x, y, ks=(1, 2, 4, 8)), abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"query_emb": np.zeros((3, 2, 1))}, ValueError, "query_emb: expected shape"),
        ({"query_emb": np.full((3, 2), np.nan)}, ValueError, "query_emb: contains NaN"),
        ({"query_labels": [0, 1]}, ValueError, "query_labels: expected 3 labels"),
        ({"query_labels": [0.5, 1.0, 1.0]}, TypeError, "query_labels: expected integer"),
        ({"query_labels": [0, 1, 2]}, ValueError, "no query has a relevant item"),
        ({"gallery_emb": np.zeros((2, 2))}, ValueError, "give both"),
        ({"gallery_emb": np.zeros((2, 5)), "gallery_labels": [0, 1]}, ValueError, "gallery_emb: dimension 5"),
        (
            {"gallery_emb": np.zeros((0, 2)), "gallery_labels": np.zeros(0, int)},
            ValueError,
            "gallery is empty",
        ),
        ({"ks": (0, 1)}, ValueError, "ks: expected positive"),
        ({"backend": "annoy"}, ValueError, "backend: expected"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = {"query_emb": np.eye(3, 2, dtype=np.float32), "query_labels": [0, 0, 1], **kwargs}
    with pytest.raises(error, match=match):
        retrieval_metrics(**args)


def test_knn_rejects_k_beyond_the_candidates():
    with pytest.raises(ValueError, match=r"k: expected 1\.\.2"):
        knn(np.eye(3, dtype=np.float32), None, 3, exclude_self=True)


# ------------------------------------------------------------------------------------------ bench eval


def test_sop_like_class_sizes():
    sizes = class_sizes(60502, 11316, np.random.default_rng(0), max_size=12)
    assert sizes.sum() == 60502 and len(sizes) == 11316
    assert sizes.min() == 2 and sizes.max() == 12


def test_eval_bench_agrees_with_pml_on_a_small_set():
    result = run_eval_bench(SMALL, backend="faiss,torch", isolate=False)
    # ours at each placement, PML with an inner-product index, PML with its default L2 index
    assert list(result["table"]["search"]) == ["faiss-cpu", "torch", "faiss-cpu", "faiss-cpu"]
    for placement in ("faiss@cpu", "torch@cpu"):
        zeros = dict.fromkeys(SHARED_METRICS, 0.0)
        assert result["max_abs_diff"][placement]["ip"] == pytest.approx(zeros, abs=1e-12)
        assert set(result["speed_ratio"][placement]) == {"ip", "l2"}
    assert result["speed_up"]["faiss@cpu"] == 1.0
    table = format_table(result)
    assert "ours torch@cpu: " in table and "the speed of ours faiss@cpu" in table and "speed ratio" in table


def test_placements_parse_and_name_what_is_wrong():
    assert parse_placements("faiss@cpu,torch@cuda, auto") == [
        Placement("faiss", "cpu"),
        Placement("torch", "cuda"),
        Placement("auto", "cpu"),
    ]
    for text, match in [
        ("annoy", "got 'annoy'"),
        ("torch@tpu", "got 'torch@tpu'"),
        ("torch,torch@cpu", "names a placement twice"),
    ]:
        with pytest.raises(ValueError, match=rf"--backend: .*{match}"):
            parse_placements(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_eval_bench_on_cuda_without_a_gpu_fails_before_any_work():
    with pytest.raises(ValueError, match=r"--backend torch@cuda: no CUDA device is available"):
        run_eval_bench(SMALL, backend="faiss,torch@cuda", isolate=False)


def test_a_gpu_chunk_takes_a_share_of_free_memory_not_a_fixed_budget(monkeypatch):
    """A 1M gallery with 8 GiB free: far more than the 19 queries a fixed 512 MiB allowed, within the free
    memory (28 bytes per query x item pair, the searcher's own estimate)."""
    gallery = torch.zeros(4, 8)
    searcher = metrics_module._TorchSearcher(gallery)
    searcher.device = torch.device("cuda")  # as for CUDA embeddings; only the memory query is faked
    free = 8 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 2**30))
    rows = metrics_module._chunk_rows(searcher, 1_000_000, 4, None)
    assert rows > 100 and rows * 1_000_000 * 28 <= free
    assert metrics_module._chunk_rows(metrics_module._TorchSearcher(gallery), 1_000_000, 4, None) == 19


@pytest.mark.parametrize("api", ["legacy", "new"])
def test_the_search_products_run_in_full_fp32_whatever_the_caller_set(api):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                seen.append(torch.backends.cuda.matmul.fp32_precision)
            return func(*args, **(kwargs or {}))

    matmul = torch.backends.cuda.matmul
    x = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    before = matmul.fp32_precision
    try:
        if api == "legacy":
            matmul.allow_tf32 = True
        else:
            matmul.fp32_precision = "tf32"
        with Products():
            knn(x, None, 3, exclude_self=True, backend="torch")
        assert seen and set(seen) == {"ieee"}
        assert matmul.fp32_precision == "tf32"  # the caller's setting, restored through its own API
        if api == "legacy":
            assert matmul.allow_tf32
    finally:  # each API restored through itself: a mix of the two makes the next read raise
        if api == "legacy":
            matmul.allow_tf32 = False
        else:
            matmul.fp32_precision = before


def test_evaluation_embeds_in_the_precision_training_uses(monkeypatch):
    """train.amp reaches the evaluation's embedding pass (bf16 autocast on CUDA only when it is on)."""
    from types import SimpleNamespace

    import bench.train.hooks as hooks
    from bench.config import EvalConfig

    calls = []
    monkeypatch.setattr(hooks, "evaluate_split", lambda *args, **kwargs: calls.append(kwargs) or {})
    for amp in (False, True):
        exp = SimpleNamespace(train=SimpleNamespace(amp=amp, channels_last=False), eval=EvalConfig())
        exp.data = SimpleNamespace(num_workers=0)
        hooks._evaluate(SimpleNamespace(device=torch.device("cpu"), exp=exp, model=None), split=None)
    assert [call.get("amp") for call in calls] == [False, True]
