"""The "refsyncbn case v1" schema: round trips, and errors naming the key."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from refsyncbn.cases import (
    RESULT_KEYS,
    SCHEMA,
    Case,
    read_case,
    read_result,
    write_case,
    write_result,
)
from refsyncbn.cli import main as cli_main
from refsyncbn.testing.strategies import cases

FIELDS = [f.name for f in dataclasses.fields(Case)]


def _small_case(**changes):
    x = np.arange(12.0).reshape(4, 3)
    base = dict(
        x=x, running_mean=np.zeros(3), running_var=np.ones(3), splits=(1, 0, 3), data_format="NC"
    )
    return Case(**{**base, **changes})


def _assert_same(a, b):
    for name in FIELDS:
        u, v = getattr(a, name), getattr(b, name)
        if isinstance(u, np.ndarray):
            assert v.dtype == u.dtype and v.shape == u.shape, name
            np.testing.assert_array_equal(v, u, err_msg=name)
        else:
            assert u == v, name


class TestRoundTrip:
    @settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(case=cases())
    def test_write_then_read_gives_the_same_case(self, tmp_path, case):
        path = tmp_path / "case.npz"
        write_case(path, case)
        _assert_same(case, read_case(path))

    def test_ragged_groups_survive_the_padding(self, tmp_path):
        case = _small_case(splits=(1, 1, 1, 1), groups=[[3], [2, 0, 1]])
        write_case(tmp_path / "c.npz", case)
        assert read_case(tmp_path / "c.npz").groups == [[3], [2, 0, 1]]

    def test_results_round_trip_and_skip_none(self, tmp_path):
        write_result(tmp_path / "rank0.npz", y=np.ones(3), dweight=None)
        out = read_result(tmp_path / "rank0.npz")
        assert list(out) == ["y"]
        np.testing.assert_array_equal(out["y"], np.ones(3))

    def test_results_reject_unknown_keys(self, tmp_path):
        with pytest.raises(ValueError, match=r"write_result: unknown key\(s\) \['dw'\]"):
            write_result(tmp_path / "r.npz", dw=np.ones(1))
        assert "dweight" in RESULT_KEYS


class TestCaseHelpers:
    def test_shards_bounds_and_groups(self):
        mask = np.array([True, False, True, True])
        case = _small_case(mask=mask, dy=np.ones((4, 3)), groups=[[0, 2], [1]])
        assert case.world_size == 3
        assert [case.bounds(r) for r in range(3)] == [(0, 1), (1, 1), (1, 4)]
        shard = case.shard(2)
        np.testing.assert_array_equal(shard["x"], case.x[1:])
        np.testing.assert_array_equal(shard["mask"], mask[1:])
        assert shard["dy"].shape == (3, 3)
        assert case.shard(1)["x"].shape == (0, 3)
        assert case.group_of(2) == [0, 2] and case.group_of(1) == [1]
        assert _small_case().group_of(1) == [0, 1, 2]
        assert set(_small_case().shard(0)) == {"x"}


class TestCaseErrorsNameTheKey:
    @pytest.mark.parametrize(
        ("changes", "match"),
        [
            ({"data_format": "NCHW"}, "key 'x' has shape"),
            ({"data_format": "CN"}, "key 'data_format' is 'CN'"),
            ({"convention": "jax"}, "key 'convention' is 'jax'"),
            ({"weight": np.ones(2), "bias": np.ones(2)}, r"key 'weight' has shape \(2,\)"),
            ({"weight": np.ones(3)}, "keys 'weight' and 'bias' must be both present"),
            ({"running_var": np.ones(4)}, r"key 'running_var' has shape \(4,\); expected \(3,\)"),
            ({"dy": np.ones((4, 2))}, r"key 'dy' has shape \(4, 2\)"),
            ({"mask": np.ones((4, 3), bool)}, r"key 'mask' has shape \(4, 3\); expected \(4,\)"),
            (
                {"splits": (1, 1)},
                r"key 'splits' is \[1, 1\]; expected .* summing to x.shape\[0\] = 4",
            ),
            ({"splits": (5, -1)}, r"key 'splits' is \[5, -1\]"),
            ({"splits": ()}, r"key 'splits' is \[\]"),
            ({"groups": [[0, 1]]}, "key 'groups' is .*every rank of the world"),
            ({"groups": [[0, 1], [1, 2]]}, "key 'groups': .*rank 1 is in group 0 and group 1"),
            ({"variance": "two_pass"}, r"key 'variance' is 'two_pass'; expected one of \('stable'"),
        ],
    )
    def test_constructor(self, changes, match):
        with pytest.raises(ValueError, match=match):
            _small_case(**changes)

    def _write(self, path, **changes):
        write_case(path, _small_case())
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
        data.update(changes)
        data = {k: v for k, v in data.items() if v is not None}
        np.savez(path, **data)
        return path

    @pytest.mark.parametrize(
        ("changes", "match"),
        [
            ({"schema": np.str_("refsyncbn case v2")}, "key 'schema' is 'refsyncbn case v2'"),
            ({"schema": None}, "key 'schema' is ''"),
            ({"x": None}, "key 'x' is missing"),
            ({"splits": None}, "key 'splits' is missing"),
            ({"splits": np.array([1.0, 3.0])}, "key 'splits' has shape .* dtype float64"),
            ({"groups": np.array([0, 1, 2])}, r"key 'groups' has shape \(3,\); expected a 2-D int"),
            ({"extra": np.ones(1)}, r"unknown key\(s\) \['extra'\]"),
            ({"running_mean": np.ones(5)}, "key 'running_mean' has shape"),
            ({"variance": np.str_("sumsq")}, "key 'variance' is 'sumsq'"),
        ],
    )
    def test_reader(self, tmp_path, changes, match):
        path = self._write(tmp_path / "bad.npz", **changes)
        with pytest.raises(ValueError, match=match) as info:
            read_case(path)
        assert str(path) in str(info.value)  # says which file

    def test_reader_names_the_file_when_it_is_not_an_npz_archive(self, tmp_path):
        single, garbage = tmp_path / "single.npz", tmp_path / "garbage.npz"
        np.save(tmp_path / "single.npy", np.ones(3))
        (tmp_path / "single.npy").rename(single)
        garbage.write_text("not a zip file")
        with pytest.raises(ValueError, match=r"holds a single array; expected an \.npz archive"):
            read_case(single)
        with pytest.raises(
            ValueError, match=re.escape(f"{garbage}: not a readable .npz case file")
        ):
            read_case(garbage)
        with pytest.raises(ValueError, match=r"not a readable \.npz case file"):
            read_case(tmp_path / "missing.npz")

    def test_reader_accepts_what_the_writer_writes(self, tmp_path):
        path = self._write(tmp_path / "ok.npz")
        assert str(np.load(path)["schema"]) == SCHEMA
        _assert_same(read_case(path), _small_case())


class TestVarianceChoice:
    """Case files and ``run`` carry ``forward``'s variance algorithm (default ``stable``)."""

    def _case(self, **changes):
        x = 1e8 + np.random.default_rng(0).standard_normal((6, 3))  # naive cancels here
        return _small_case(x=x, splits=(2, 4), **changes)

    def test_files_without_the_key_read_as_stable(self, tmp_path):
        path = tmp_path / "old.npz"
        write_case(path, _small_case())
        with np.load(path) as f:
            np.savez(path, **{k: f[k] for k in f.files if k != "variance"})
        assert read_case(path).variance == "stable"

    @pytest.mark.parametrize(
        ("in_file", "flag", "used"),
        [
            ("naive", None, "naive"),
            ("stable", None, "stable"),
            ("naive", "stable", "stable"),
            ("stable", "naive", "naive"),
        ],
    )
    def test_run_uses_the_file_choice_unless_overridden(self, tmp_path, in_file, flag, used):
        write_case(tmp_path / "c.npz", self._case(variance=in_file))
        argv = ["run", str(tmp_path / "c.npz"), str(tmp_path / "o"), "--world", "2"]
        assert cli_main(argv + ([] if flag is None else ["--variance", flag])) == 0
        got = read_result(tmp_path / "o" / "rank0.npz")["running_var"]
        write_case(tmp_path / "ref.npz", self._case(variance=used))
        assert (
            cli_main(["run", str(tmp_path / "ref.npz"), str(tmp_path / "r"), "--world", "2"]) == 0
        )
        np.testing.assert_array_equal(got, read_result(tmp_path / "r" / "rank0.npz")["running_var"])
        other = self._case(variance="naive" if used == "stable" else "stable")
        write_case(tmp_path / "other.npz", other)
        assert (
            cli_main(["run", str(tmp_path / "other.npz"), str(tmp_path / "x"), "--world", "2"]) == 0
        )
        assert (got != read_result(tmp_path / "x" / "rank0.npz")["running_var"]).any()
