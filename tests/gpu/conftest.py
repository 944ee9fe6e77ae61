"""Tests marked `gpu` need a CUDA device: skipped without one, so the CPU suite collects them harmlessly.
`smoothap-bench bench gpu-check` runs them first on a machine that has one."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
