"""Benchmark SyncBatchNorm: ``mpiexec -n K python -m mpi4py scripts/bench_syncbn.py [options]``.

A thin wrapper around ``python -m refsyncbn bench`` (:mod:`refsyncbn.cli.bench`);
``--help`` lists the options.
"""

import argparse
import sys

from refsyncbn.cli import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
