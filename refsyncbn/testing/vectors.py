"""Golden vectors: ``python -m refsyncbn vectors OUT_DIR`` for tests in any language.

Layout of ``OUT_DIR`` (version :data:`VERSION`)::

    manifest.json                    what is where (below)
    cases/<base>-<convention>.npz    inputs, schema "refsyncbn case v1" (refsyncbn.cases)
    expected/<name>/rank{r}.npz      float64 outputs of world rank r (oracle)
    bounds/<name>/rank{r}.npz        per-element error bounds of those outputs

Every base problem (:data:`BASES`: each data format, float16/32/64, uneven
splits with an empty rank, ragged non-contiguous process groups, a mask,
eval mode, a large mean/std ratio, no affine parameters) is written once per
convention preset, with the preset's default ``eps`` and ``momentum``.
Expected outputs hold ``y``, ``dx``, ``dweight``, ``dbias``,
``running_mean``, ``running_var`` (keys absent when the case has no ``dy`` /
no affine parameters), computed by the float64 oracle
(:func:`refsyncbn.testing.expected_outputs`) with the convention's parameter
gradient reduction; the bounds are :class:`ErrorModel` ``()`` (float32
accumulation, cancellation-free variance): an implementation passes where
``|actual - expected| <= bound`` element-wise (NaN matched by NaN).

``manifest.json`` lists, per case: the file names, ``data_format`` and its
channel axis, dtype and shape of ``x``, ``splits``, ``groups``, ``eps``,
``momentum``, ``training``, the convention's rules, and per rank and output
its shape, dtype and ``tolerance`` (the smallest element bound: one absolute
tolerance that implies the per-element one); plus the error model, the
version and the SHA-256 of every file.

Every ``.npz`` is an uncompressed zip of plain ``.npy`` arrays (scalars as
0-d arrays, strings as ``<U`` arrays), readable by ``numpy.load`` and by C++
``cnpy::npz_load``. Members are written in a fixed order with a fixed
timestamp (1980-01-01), and inputs come from an integer hash (splitmix64),
not a NumPy generator, so a re-run writes the same bytes; expected outputs
are float64 sums, identical on the same platform and NumPy (elsewhere they may
differ in the last bits, far inside every bound).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ..cases import SCHEMA, Case, write_case, write_result
from ..conventions import CONVENTIONS
from ..layouts import get_layout
from .oracle import expected_outputs
from .tolerances import ErrorModel

__all__ = ["BASES", "VERSION", "add_arguments", "golden_cases", "main", "write_vectors"]

VERSION = 1
_MODEL = ErrorModel()
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

BASES = {
    # name: (data_format, shape, dtype, splits, groups, |mean| scale, options)
    "nchw-f32-uneven": ("NCHW", (5, 3, 2, 2), "float32", (1, 4), None, 1.0, ()),
    "nhwc-f32-empty-rank": ("NHWC", (4, 2, 2, 3), "float32", (0, 3, 1), None, 1.0, ()),
    "nc-f64-groups": ("NC", (10, 4), "float64", (2, 3, 1, 4), [[0, 2], [1, 3]], 1.0, ()),
    "ncl-f16": ("NCL", (6, 2, 5), "float16", (3, 3), None, 1.0, ()),
    "ndhwc-f32-mask": ("NDHWC", (4, 2, 2, 1, 3), "float32", (2, 2), None, 1.0, ("mask",)),
    "ncdhw-f32-eval": ("NCDHW", (3, 2, 2, 2, 2), "float32", (1, 2), None, 1.0, ("eval",)),
    "nlc-f64-no-affine": ("NLC", (4, 3, 2), "float64", (3, 1), None, 1.0, ("no_affine",)),
    "nc-f32-large-mean": ("NC", (16, 2), "float32", (5, 11), None, 500.0, ()),
}
"""Base problems; each is written for every convention preset."""


def _uniform(seed: int, n: int) -> np.ndarray:
    """The first ``n`` outputs of splitmix64 seeded with ``seed``, as floats in [0, 1)."""
    steps = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = steps + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _values(seed, shape, lo=-1.0, hi=1.0) -> np.ndarray:
    return lo + (hi - lo) * _uniform(seed, int(np.prod(shape))).reshape(shape)


def _base_case(index: int, spec, convention: str) -> Case:
    """The ``index``-th base problem for ``convention``."""
    data_format, shape, dtype, splits, groups, loc_scale, options = spec
    layout = get_layout(data_format)
    c = layout.channels(shape)
    seed = 1000 * (index + 1)
    bshape = layout.channel_vector_shape()
    loc = np.reshape(_values(seed, (c,), -2.0, 2.0) * loc_scale, bshape)
    scale = np.reshape(_values(seed + 100, (c,), 0.5, 2.0), bshape)
    x = (loc + scale * _values(seed + 200, shape) * np.sqrt(3.0)).astype(dtype)
    conv = CONVENTIONS[convention]
    kwargs = {}
    if "no_affine" not in options:
        kwargs["weight"] = _values(seed + 300, (c,), 0.5, 1.5).astype(dtype)
        kwargs["bias"] = _values(seed + 400, (c,), -0.5, 0.5).astype(dtype)
    if "mask" in options:
        kwargs["mask"] = _values(seed + 500, layout.mask_shape(shape)) < 0.5
        kwargs["mask"].reshape(-1)[::3] = True
    return Case(
        x=x,
        running_mean=_values(seed + 600, (c,)).astype(dtype),
        running_var=_values(seed + 700, (c,), 0.5, 1.5).astype(dtype),
        splits=splits,
        data_format=data_format,
        convention=convention,
        eps=conv.eps,
        momentum=conv.momentum,
        training="eval" not in options,
        dy=_values(seed + 800, shape).astype(dtype),
        groups=groups,
        **kwargs,
    )


def golden_cases() -> dict[str, Case]:
    """Every golden case by name ``<base>-<convention>``, in a fixed order.

    Examples
    --------
    >>> cases = golden_cases()
    >>> len(cases) == len(BASES) * len(CONVENTIONS)
    True
    >>> cases["nc-f64-groups-torch"].groups
    [[0, 2], [1, 3]]
    """
    return {
        f"{base}-{conv}": _base_case(i, spec, conv)
        for i, (base, spec) in enumerate(BASES.items())
        for conv in CONVENTIONS
    }


def _write_zip(path: Path, writer, *args, **kwargs) -> None:
    """Run an ``np.savez``-based ``writer`` into memory; store it with fixed timestamps."""
    raw = io.BytesIO()
    writer(raw, *args, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        zipfile.ZipFile(io.BytesIO(raw.getvalue())) as src,
        zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst,
    ):
        for name in src.namelist():
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            dst.writestr(info, src.read(name))


def _describe(arrays: dict, bounds: dict) -> dict:
    return {
        k: {
            "shape": list(np.shape(v)),
            "dtype": "float64",
            "tolerance": float(np.min(bounds[k])) if np.size(bounds[k]) else None,
        }
        for k, v in arrays.items()
    }


def write_vectors(out_dir) -> dict:
    """Write the golden-vector set to ``out_dir`` (see the module docstring).

    Returns
    -------
    dict
        The manifest (also written as ``out_dir/manifest.json``).
    """
    out_dir = Path(out_dir)
    entries = []
    for name, case in golden_cases().items():
        conv = CONVENTIONS[case.convention]
        expected = expected_outputs(case)
        bounds = _MODEL.bounds(case, expected)
        _write_zip(out_dir / "cases" / f"{name}.npz", write_case, case)
        ranks = []
        for r, (exp, bnd) in enumerate(zip(expected, bounds, strict=True)):
            outs = {k: np.asarray(exp[k], np.float64) for k in bnd if exp.get(k) is not None}
            files = {
                "expected": f"expected/{name}/rank{r}.npz",
                "bounds": f"bounds/{name}/rank{r}.npz",
            }
            _write_zip(out_dir / files["expected"], write_result, **outs)
            _write_zip(out_dir / files["bounds"], write_result, **{k: bnd[k] for k in outs})
            ranks.append({"rank": r, **files, "outputs": _describe(outs, bnd)})
        layout = get_layout(case.data_format)
        entries.append(
            {
                "name": name,
                "base": name[: -len(case.convention) - 1],
                "file": f"cases/{name}.npz",
                "convention": case.convention,
                "data_format": case.data_format,
                "channel_axis": layout.channel_axis,
                "dtype": case.x.dtype.name,
                "shape": list(case.x.shape),
                "splits": list(case.splits),
                "groups": case.groups,
                "eps": case.eps,
                "momentum": case.momentum,
                "training": case.training,
                "affine": case.weight is not None,
                "dy": case.dy is not None,
                "mask": case.mask is not None,
                "rules": {
                    k: getattr(conv, k)
                    for k in ("momentum_meaning", "running_var", "weighting", "param_grads")
                },
                "ranks": ranks,
            }
        )
    digests = {
        str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for sub in ("cases", "expected", "bounds")
        for p in sorted((out_dir / sub).rglob("*.npz"))
    }
    manifest = {
        "format": "refsyncbn golden vectors",
        "version": VERSION,
        "case_schema": SCHEMA,
        "error_model": {
            "accumulation": _MODEL.accumulation,
            "variance": _MODEL.variance,
            "summation": _MODEL.summation,
            "safety": _MODEL.safety,
        },
        "cases": entries,
        "sha256": digests,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (out_dir / "manifest.json").write_text(text, encoding="utf-8")
    return manifest


def add_arguments(parser) -> None:
    """Arguments of the ``vectors`` subcommand."""
    parser.add_argument("out_dir", type=Path, help="directory to write the vector set into")


def main(args) -> int:
    """Write the vectors and say where; 0 on success."""
    manifest = write_vectors(args.out_dir)
    print(
        f"refsyncbn vectors v{VERSION}: {len(manifest['cases'])} cases, "
        f"{len(manifest['sha256'])} files, manifest {args.out_dir / 'manifest.json'}"
    )
    return 0
