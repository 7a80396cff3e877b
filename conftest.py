"""Project-wide pytest configuration: hypothesis profiles and the report header."""

import importlib.util
import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=_SLOW_OK)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
settings.load_profile(PROFILE)


def pytest_report_header(config):
    import numpy

    return [f"refsyncbn: numpy {numpy.__version__}, hypothesis profile {PROFILE!r}"]

# The CuPy backend imports cupy at module level (it is only imported once CuPy
# arrays arrive); without CuPy its doctests cannot even be collected.
collect_ignore = [] if importlib.util.find_spec("cupy") else ["refsyncbn/kernels/_cupy.py"]
