"""The losses' search spaces hold the values the literature and our own tuning found, away from the edges.

Each point below is a full set of a loss's tuned parameters from one source: the paper's or the authors'
code's defaults, the optima of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020; listed in
KevinMusgrave/powerful-benchmarker, docs/papers/mlrc.md), and the best trials of the committed Omniglot
comparison (results/omniglot/, commit 0fb2217; Smooth-AP's from smooth_ap_temperature.csv, the others
replayed from the study's seeded sampler and committed trial values, a replay that reproduces that CSV
exactly). A range that is narrowed past one of them, or caps one again at its edge, fails here.
"""

import math
import warnings

import optuna
import pytest

from losses import get_loss, get_spec

EDGE = 0.05  # within 5% of the range (on the log scale for log ranges) from an edge counts as at the edge

# (loss, parameter) -> the edge that is the parameter's natural bound, which no range could extend past
NATURAL_EDGES = {
    ("contrastive", "pos_margin"): "low",  # 0: distances are never negative, a negative margin acts as 0
    ("blackbox_ap", "margin"): "low",  # 0: no margin
    ("roadmap", "calibration_weight"): "low",  # 0: SupAP alone (the authors' supap.yaml)
}

POINTS = {
    "smooth_ap": [
        ("paper", {"temperature": 0.01}),
        ("Omniglot best", {"temperature": 0.0883987}),
        ("Omniglot 2nd", {"temperature": 0.0997007}),
        ("Omniglot 3rd", {"temperature": 0.0810729}),
    ],
    "blackbox_ap": [
        ("SupRank port of the authors' code", {"lambda_val": 4.0, "margin": 0.02}),
        ("Omniglot best, former variant", {"lambda_val": 44.2, "margin": 0.0724}),
    ],
    "triplet": [
        ("FaceNet", {"margin": 0.2, "miner": "semihard"}),
        ("pytorch-metric-learning default", {"margin": 0.05, "miner": "all"}),
        ("reality check CUB200", {"margin": 0.0961, "miner": "all"}),
        ("reality check Cars196", {"margin": 0.1190, "miner": "all"}),
        ("reality check SOP", {"margin": 0.0451, "miner": "all"}),
        ("reality check CUB200 batch 256", {"margin": 0.1368, "miner": "all"}),
        ("Omniglot best", {"margin": 0.01649, "miner": "semihard"}),
        ("Omniglot 2nd", {"margin": 0.0126, "miner": "semihard"}),
    ],
    "contrastive": [
        ("pytorch-metric-learning default", {"pos_margin": 0.0, "neg_margin": 1.0}),
        ("reality check CUB200 (pos -0.2, which acts as 0)", {"pos_margin": 0.0, "neg_margin": 0.3841}),
        ("reality check Cars196", {"pos_margin": 0.2652, "neg_margin": 0.5409}),
        ("reality check SOP", {"pos_margin": 0.2850, "neg_margin": 0.5130}),
        ("reality check CUB200 batch 256", {"pos_margin": 0.2227, "neg_margin": 0.7694}),
        ("Omniglot best", {"pos_margin": 0.4866, "neg_margin": 0.9622}),
        ("Omniglot 2nd", {"pos_margin": 0.2678, "neg_margin": 1.168}),
    ],
    "multi_similarity": [
        ("authors' code", {"alpha": 2.0, "beta": 40.0, "base": 0.5, "epsilon": 0.1}),
        ("pytorch-metric-learning defaults", {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}),
        ("reality check CUB200", {"alpha": 17.97, "beta": 75.66, "base": 0.77, "epsilon": 0.39}),
        ("reality check Cars196", {"alpha": 7.49, "beta": 47.99, "base": 0.63, "epsilon": 0.72}),
        ("reality check SOP", {"alpha": 15.94, "beta": 156.61, "base": 0.72, "epsilon": 0.34}),
        ("reality check CUB200 batch 256", {"alpha": 11.63, "beta": 55.20, "base": 0.85, "epsilon": 0.42}),
        ("Omniglot best", {"alpha": 9.229, "beta": 21.24, "base": 0.9772, "epsilon": 0.01427}),
        ("Omniglot 2nd", {"alpha": 8.724, "beta": 12.01, "base": 0.9779, "epsilon": 0.01043}),
    ],
    "roadmap": [
        ("authors' roadmap.yaml", {"temperature": 0.01, "rho": 100.0, "calibration_weight": 1.0}),
        ("authors' supap.yaml", {"temperature": 0.01, "rho": 100.0, "calibration_weight": 0.0}),
        ("authors' slope grid, low end", {"temperature": 0.01, "rho": 0.1, "calibration_weight": 1.0}),
    ],
    "recall_at_k": [("authors' src/main.py", {"temperature": 0.01})],
    "pnp": [
        ("authors' README recipe (PNP-D_q)", {"alpha": 4.0, "temperature": 0.01}),
        ("pytorch-metric-learning's default alpha", {"alpha": 1.0, "temperature": 0.01}),
    ],
    "fastap": [
        ("paper, authors' code and pytorch-metric-learning", {"num_bins": 10}),
        ("reality check CUB200", {"num_bins": 17}),
        ("reality check Cars196", {"num_bins": 27}),
        ("reality check SOP", {"num_bins": 16}),
        ("reality check CUB200 batch 256", {"num_bins": 86}),
        ("Omniglot best", {"num_bins": 11}),
    ],
}
CASES = [(loss, source, params) for loss, points in POINTS.items() for source, params in points]


def position(value: float, distribution) -> float:
    """Where `value` lies in the distribution's range: 0 at the low end, 1 at the high end."""
    low, high = distribution.low, distribution.high
    if distribution.log:
        value, low, high = math.log(value), math.log(low), math.log(high)
    return (value - low) / (high - low)


@pytest.mark.parametrize("loss, source, params", CASES, ids=[f"{loss}-{source}" for loss, source, _ in CASES])
def test_each_known_value_lies_inside_the_range_away_from_its_edges(loss, source, params):
    trial = optuna.trial.FixedTrial(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FixedTrial warns when a value lies outside its distribution
        suggested = get_spec(loss).search_space(trial)
    assert suggested == params
    for name, value in params.items():
        distribution = trial.distributions[name]
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            continue
        where = position(value, distribution)
        natural = NATURAL_EDGES.get((loss, name))
        low_ok = where >= EDGE or (natural == "low" and where >= 0)
        high_ok = where <= 1 - EDGE or (natural == "high" and where <= 1)
        assert low_ok and high_ok, (
            f"{loss}.{name} = {value} ({source}) lies at {where:.1%} of "
            f"[{distribution.low}, {distribution.high}]{' (log)' if distribution.log else ''}"
        )


@pytest.mark.parametrize("loss", sorted(POINTS))
def test_every_sampled_point_builds_its_loss(loss):
    """Parameters that constrain each other (contrastive: pos_margin < neg_margin) are drawn consistently."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(200):
        get_loss(loss, **get_spec(loss).search_space(study.ask()))
