"""Shared test setup: hypothesis profiles, the GPU marker, deterministic torch."""

import os

# Spinning OpenMP threads make subprocess-heavy tests crawl on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# ci: few examples on 2 cores; dev: more locally; gpu: the same tests on an H100
settings.register_profile("ci", max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("gpu", max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
