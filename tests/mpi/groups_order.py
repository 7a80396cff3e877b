"""Group sub-communicators under real MPI: ranks numbered in world-rank order.

Run as ``mpiexec -n K python -m mpi4py tests/mpi/groups_order.py`` (K >= 2):
every rank checks :func:`tests.test_groups_order.expectations` for the groups
of :func:`tests.test_groups_order.world_groups`; the verdict is collective.
"""

from __future__ import annotations

import sys

from refsyncbn.comm import default_comm
from tests.mpi._collective import Verdict
from tests.test_groups_order import check_group_comm


def main() -> int:
    verdict = Verdict("groups_order")
    for failure in check_group_comm(default_comm()):
        verdict.expect(False, failure)
    return verdict.finish()


if __name__ == "__main__":
    sys.exit(main())
