"""Project-wide pytest configuration: hypothesis profiles and the report header."""

import importlib.util
import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=_SLOW_OK)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
settings.load_profile(PROFILE)


def pytest_report_header(config):
    import numpy

    return [f"refsyncbn: numpy {numpy.__version__}, hypothesis profile {PROFILE!r}"]


# The CuPy and Numba backends import their package at module level (they are only
# imported when chosen); without it their doctests cannot even be collected.
collect_ignore = [
    f"refsyncbn/kernels/_{name}.py"
    for name in ("cupy", "numba")
    if importlib.util.find_spec(name) is None
]
