"""The checker on 2 MPI ranks; rank 0 prints each candidate's verdict and fingerprint (JSON).

Launched by tests/test_checker.py as ``mpiexec -n 2 python -m mpi4py THIS_FILE``.
"""

import json
import sys
from pathlib import Path


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _candidates import lowprec_candidate

    from refsyncbn.comm import MPIComm
    from refsyncbn.testing.checker import check, reference_candidate

    comm = MPIComm()
    result = {}
    for name, candidate, expect in (
        ("torch", reference_candidate("torch"), "torch"),
        ("float32_sumsq", lowprec_candidate("float32", "sumsq"), "reference"),
    ):
        report = check(candidate, expect=expect, comm=comm)
        result[name] = {
            "passed": report.passed,
            "fingerprint": {k: t.value for k, t in report.fingerprint.items()},
        }
    if comm.rank == 0:
        print("RESULT " + json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
