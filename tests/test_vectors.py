"""Golden vectors: reproducible bytes, a manifest that describes them, oracle-exact contents."""

import argparse
import hashlib
import json
import zipfile

import numpy as np
import pytest

from refsyncbn import SimulatedWorld
from refsyncbn.cases import RESULT_KEYS, read_case, read_result, run_rank
from refsyncbn.conventions import CONVENTIONS
from refsyncbn.testing import expected_outputs, vectors
from refsyncbn.testing.tolerances import compare_outputs


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    vectors.write_vectors(out)
    return out


@pytest.fixture(scope="module")
def manifest(vector_dir):
    return json.loads((vector_dir / "manifest.json").read_text(encoding="utf-8"))


def _files(root):
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


class TestReproducible:
    def test_a_rerun_writes_the_same_bytes(self, vector_dir, tmp_path):
        parser = argparse.ArgumentParser()
        vectors.add_arguments(parser)
        assert vectors.main(parser.parse_args([str(tmp_path)])) == 0
        assert _files(tmp_path) == _files(vector_dir)

    def test_manifest_hashes_every_npz(self, vector_dir, manifest):
        npz = {k: v for k, v in _files(vector_dir).items() if k.endswith(".npz")}
        assert manifest["sha256"] == {k: hashlib.sha256(v).hexdigest() for k, v in npz.items()}

    def test_zip_members_are_stored_plain_npy_with_a_fixed_date(self, vector_dir):
        for path in (vector_dir / "cases").glob("*.npz"):
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    assert info.filename.endswith(".npy")
                    assert info.compress_type == zipfile.ZIP_STORED
                    assert info.date_time == (1980, 1, 1, 0, 0, 0)

    def test_inputs_do_not_depend_on_numpy_random(self):
        # splitmix64 of 0: the first output of the reference algorithm
        assert vectors._uniform(0, 1)[0] == (0xE220A8397B1DCDAF >> 11) * 2.0**-53


class TestManifest:
    def test_version_schema_and_every_convention_per_base(self, manifest):
        assert manifest["version"] == vectors.VERSION == 1
        assert manifest["case_schema"] == "refsyncbn case v1"
        pairs = {(c["base"], c["convention"]) for c in manifest["cases"]}
        assert pairs == {(b, conv) for b in vectors.BASES for conv in CONVENTIONS}

    def test_describes_each_case_file_and_output(self, vector_dir, manifest):
        for entry in manifest["cases"]:
            case = read_case(vector_dir / entry["file"])
            assert entry["shape"] == list(case.x.shape)
            assert entry["dtype"] == case.x.dtype.name
            assert entry["splits"] == list(case.splits)
            assert entry["convention"] == case.convention
            assert len(entry["ranks"]) == case.world_size
            for rank in entry["ranks"]:
                got = read_result(vector_dir / rank["expected"])
                bounds = read_result(vector_dir / rank["bounds"])
                assert set(got) == set(rank["outputs"]) == set(bounds)
                for key, desc in rank["outputs"].items():
                    assert list(got[key].shape) == desc["shape"]
                    assert got[key].dtype == np.float64
                    assert desc["tolerance"] is None or desc["tolerance"] == bounds[key].min()

    def test_covers_the_hard_parts(self, vector_dir, manifest):
        entries = manifest["cases"]
        assert {e["data_format"] for e in entries} == {
            "NC",
            "NCL",
            "NLC",
            "NCHW",
            "NHWC",
            "NCDHW",
            "NDHWC",
        }
        assert {e["dtype"] for e in entries} == {"float16", "float32", "float64"}
        assert any(0 in e["splits"] for e in entries)
        assert any(e["groups"] for e in entries) and any(e["mask"] for e in entries)
        assert any(not e["training"] for e in entries) and any(not e["affine"] for e in entries)


class TestContents:
    def test_expected_outputs_are_the_oracle(self, vector_dir, manifest):
        for entry in manifest["cases"]:
            case = read_case(vector_dir / entry["file"])
            oracle = expected_outputs(case)
            for rank in entry["ranks"]:
                got = read_result(vector_dir / rank["expected"])
                want = {
                    k: oracle[rank["rank"]][k]
                    for k in RESULT_KEYS
                    if oracle[rank["rank"]][k] is not None
                }
                assert set(got) == set(want)
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key])

    def test_the_reference_is_inside_the_written_bounds(self, vector_dir, manifest):
        for entry in manifest["cases"]:
            case = read_case(vector_dir / entry["file"])
            pg = CONVENTIONS[case.convention].param_grads
            if pg != "local":  # run_rank returns local parameter gradients
                continue
            actual = SimulatedWorld(case.world_size).run(lambda comm, c=case: run_rank(c, comm))
            expected = [read_result(vector_dir / r["expected"]) for r in entry["ranks"]]
            bounds = [read_result(vector_dir / r["bounds"]) for r in entry["ranks"]]
            checks = compare_outputs(actual, expected, bounds, data_format=case.data_format)
            assert all(c.passed for c in checks), [c.describe() for c in checks if not c.passed]

    def test_a_perturbed_output_breaks_its_bound(self, vector_dir, manifest):
        entry = manifest["cases"][0]
        rank = entry["ranks"][-1]
        expected = read_result(vector_dir / rank["expected"])
        bounds = read_result(vector_dir / rank["bounds"])
        bad = dict(expected, y=expected["y"] + 4 * bounds["y"])
        (check,) = [
            c
            for c in compare_outputs([bad], [expected], [bounds], data_format=entry["data_format"])
            if c.quantity == "y"
        ]
        assert check.ratio == pytest.approx(4.0)
