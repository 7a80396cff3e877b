"""Real-framework adapters (refsyncbn.adapters) and ``python -m refsyncbn conform``.

The torch tests run wherever torch is installed (CI installs the CPU wheel):
the CPU stand-ins for SyncBatchNorm's CUDA-only ops against torch's own CPU
``F.batch_norm`` on the whole batch, and two short gloo runs (2 ranks) fed to
the checker. Flax and Keras need their own environment (jax, tensorflow) and
skip here when absent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refsyncbn import adapters
from refsyncbn.adapters import torch as torch_adapter
from refsyncbn.cases import Case, run_rank
from refsyncbn.cli import conform
from refsyncbn.cli import main as cli_main
from refsyncbn.comm import SimulatedWorld
from refsyncbn.conventions import get_convention
from refsyncbn.testing.checker import probe_cases

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
needs_flax = pytest.mark.skipif(adapters.missing("flax") is not None, reason="needs jax and flax")
needs_keras = pytest.mark.skipif(
    adapters.missing("keras") is not None, reason="needs tensorflow and keras"
)


class TestRegistry:
    def test_unknown_framework_is_named(self):
        with pytest.raises(ValueError, match="framework is 'jax'; expected one of"):
            adapters.get_adapter("jax")

    def test_missing_framework_says_what_to_install(self, monkeypatch):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        assert adapters.missing("flax") == "needs jax and flax (pip install 'refsyncbn[flax]')"
        with pytest.raises(RuntimeError, match=r"keras adapter: needs tensorflow and keras"):
            adapters.run("keras", {})

    def test_conform_without_the_framework_is_one_line_and_exit_2(self, monkeypatch, capsys):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        assert cli_main(["conform", "torch"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["refsyncbn conform torch: needs torch (pip install 'refsyncbn[torch]')"]

    def test_a_masked_case_is_not_expressible_in_torch(self):
        x = np.arange(8.0).reshape(4, 2)
        case = Case(
            x=x,
            running_mean=np.zeros(2),
            running_var=np.ones(2),
            splits=(2, 2),
            data_format="NC",
            mask=np.ones(4, bool),
        )
        assert torch_adapter.unsupported(case) == "nn.SyncBatchNorm takes no mask"
        assert torch_adapter.unsupported(dataclasses.replace(case, mask=None)) == ""

    def test_workers_past_the_timeout_are_killed(self):
        sleeper = (["timeit", "-n", "1", "-r", "1", "import time; time.sleep(60)"], {})
        failure = adapters._launch([sleeper, sleeper], timeout=1.0)
        assert failure.startswith("workers killed after the 1 s timeout")


def _reference_as_framework(convention):
    """A stand-in for adapters.run: the reference in ``convention``'s rules, torch's expressibility."""

    def fake_run(framework, cases, *, timeout):
        outcomes = {}
        for name, case in cases.items():
            if torch_adapter.unsupported(case):
                outcomes[name] = adapters.Outcome(not_expressible="no mask")
                continue
            weight = get_convention(case.convention).batch_weight(case.momentum)
            ours = dataclasses.replace(
                case,
                convention=convention,
                momentum=(
                    weight
                    if get_convention(convention).momentum_meaning == "update"
                    else 1 - weight
                ),
            )
            outcomes[name] = adapters.Outcome(
                outputs=SimulatedWorld(case.world_size).run(lambda comm, c=ours: run_rank(c, comm))
            )
        return outcomes

    return fake_run


class TestConform:
    @pytest.fixture
    def fake(self, monkeypatch):
        monkeypatch.setattr(conform, "missing", lambda framework: None)
        monkeypatch.setattr(torch_adapter, "label", lambda: torch_adapter.LABEL)  # no torch import
        return lambda convention: monkeypatch.setattr(
            conform, "run", _reference_as_framework(convention)
        )

    def test_an_implementation_that_follows_the_preset_passes(self, fake, tmp_path):
        fake("torch")
        out = tmp_path / "r.md"
        assert cli_main(["conform", "torch", "--cases", "6", "--out", str(out)]) == 0
        report = json.loads(out.with_suffix(".json").read_text())
        verdicts = [r["verdict"] for r in report["cases"]]
        assert verdicts.count("not expressible") == 1 and verdicts.count("pass") == 14
        assert report["consistent_presets"] == ["torch"]
        assert (
            "| random_05 | 3 | [2, 4, 3] | [[0, 2], [1]] | NCDHW | float32 | train | "
            "not expressible |  | no mask |"
        ) in out.read_text()

    def test_a_deviation_fails_with_exit_1_unless_it_is_a_known_one(
        self, fake, tmp_path, monkeypatch
    ):
        fake("reference")  # biased running variance where torch's is unbiased
        out = tmp_path / "r.md"
        assert cli_main(["conform", "torch", "--cases", "0", "--out", str(out)]) == 1
        report = json.loads(out.with_suffix(".json").read_text())
        failed = {
            r["case"]: r["worst"]["quantity"] for r in report["cases"] if r["verdict"] == "FAIL"
        }
        assert failed and set(failed.values()) == {"running_var"}
        assert report["unexplained_failures"] == sorted(failed, key=list(failed).index)
        monkeypatch.setattr(
            torch_adapter, "known_deviation", lambda case, variant="": "biased on purpose"
        )
        assert cli_main(["conform", "torch", "--cases", "0", "--out", str(out)]) == 0
        assert "known deviation: biased on purpose" in out.read_text()
        # a deviation that explains other outputs only does not excuse the running variance
        monkeypatch.setattr(torch_adapter, "DEVIATIONS", {"biased on purpose": ("dbias",)})
        assert cli_main(["conform", "torch", "--cases", "0", "--out", str(out)]) == 1
        assert "beyond what the known deviation explains (dbias only)" in out.read_text()

    def test_cases_cover_the_hard_regimes(self):
        cases = conform.conform_cases("flax", 24, seed=0).values()
        assert {c.world_size for c in cases} == {2, 3}
        assert any(1 in c.splits and 0 in c.splits for c in cases)
        assert any(c.groups for c in cases) and any(c.mask is not None for c in cases)
        assert any(not c.training for c in cases)
        assert all(c.convention == "flax" and c.momentum == 0.99 for c in cases)
        for c in cases:  # every group holds two values per channel
            for g in c.groups or [list(range(c.world_size))]:
                assert sum(c.splits[r] for r in g) >= 2


class TestKnownDeviations:
    def _case(self, **kw):
        x = np.arange(12.0).reshape(6, 2)
        return Case(
            x=x,
            dy=np.ones_like(x),
            weight=np.ones(2),
            bias=np.zeros(2),
            running_mean=np.zeros(2),
            running_var=np.ones(2),
            splits=(2, 4, 0),
            data_format="NC",
            **kw,
        )

    def test_flax_names_empty_devices_ragged_groups_and_shard_map_sums(self):
        flax = adapters.get_adapter("flax")
        empty = flax.known_deviation(self._case())
        assert "empty device's parameter gradients are NaN" in empty
        assert flax.DEVIATIONS[empty] == ("dweight", "dbias")  # y and statistics must match
        ragged = self._case(groups=[[0, 2], [1]])
        assert "unequal sizes" in flax.known_deviation(ragged)
        full = dataclasses.replace(self._case(), splits=(2, 2, 2))
        assert flax.known_deviation(full) == ""
        assert "group's sums" in flax.known_deviation(full, "shard_map")
        assert flax.unsupported(ragged) == ""

    def test_keras_cannot_state_groups_and_names_its_mask_behaviour(self):
        keras = adapters.get_adapter("keras")
        assert "no process groups" in keras.unsupported(self._case(groups=[[0, 2], [1]]))
        masked = self._case(mask=np.ones(6, bool))
        assert keras.unsupported(masked) == ""
        assert "turns synchronization off" in keras.known_deviation(masked)
        one = Case(
            x=np.ones((4, 2, 1)),
            running_mean=np.zeros(1),
            running_var=np.ones(1),
            splits=(2, 2),
            data_format="NLC",
            mask=np.ones((4, 2), bool),
        )
        assert "IndexError" in keras.known_deviation(one)
        chw = Case(
            x=np.ones((4, 1, 2)),
            running_mean=np.zeros(1),
            running_var=np.ones(1),
            splits=(2, 2),
            data_format="NCL",
            mask=np.ones((4, 2), bool),
        )
        assert "channel-last formats only" in keras.unsupported(chw)


def _stand_in_sync_bn(x, splits, weight, bias, rm, rv, momentum, eps, dy):
    """SyncBatchNorm's algorithm over ``splits`` with the CPU stand-ins, in one process."""
    import torch

    ops = torch_adapter.cpu_sync_ops()
    parts, dys = torch.split(x, splits), torch.split(dy, splits)
    stats = [ops["batch_norm_stats"](p, eps) for p in parts if p.numel()]
    counts = torch.tensor(
        [float(p.numel() // p.shape[1]) for p in parts if p.numel()], dtype=rm.dtype
    )
    mean, invstd = ops["batch_norm_gather_stats_with_counts"](
        x,
        torch.stack([s[0] for s in stats]),
        torch.stack([s[1] for s in stats]),
        rm,
        rv,
        momentum,
        eps,
        counts,
    )
    # like nn.SyncBatchNorm, an empty rank calls no op: empty outputs, zero sums
    y = torch.cat(
        [
            ops["batch_norm_elemt"](p, weight, bias, mean, invstd, eps) if p.numel() else p
            for p in parts
        ]
    )
    red = [
        ops["batch_norm_backward_reduce"](g, p, mean, invstd, weight, True, True, True)
        for g, p in zip(dys, parts, strict=True)
        if p.numel()
    ]
    sum_dy, sum_dy_xmu = sum(r[0] for r in red), sum(r[1] for r in red)
    dx = torch.cat(
        [
            ops["batch_norm_backward_elemt"](
                g, p, mean, invstd, weight, sum_dy, sum_dy_xmu, counts.to(torch.int32)
            )
            if p.numel()
            else g
            for g, p in zip(dys, parts, strict=True)
        ]
    )
    return y, dx, sum(r[2] for r in red), sum(r[3] for r in red), rm, rv


def _torch_batch_norm(x, weight, bias, rm, rv, momentum, eps, dy):
    """torch's own CPU batch norm on the whole batch, with autograd."""
    import torch.nn.functional as F

    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad, rm, rv


@needs_torch
class TestTorchStandIns:
    # measured: at most 9.3e-16 (float64) and 5.0e-6 (float32) of each output's largest value
    @pytest.mark.parametrize("dtype, rtol", [("float64", 1e-14), ("float32", 2e-5)])
    @pytest.mark.parametrize("shape, splits", [((7, 3, 5), (2, 0, 4, 1)), ((6, 2), (1, 5))])
    def test_match_torch_cpu_batch_norm_on_the_whole_batch(self, dtype, rtol, shape, splits):
        self._compare(dtype, rtol, shape, splits)

    def test_the_float64_bound_rejects_float32_accumulation(self, monkeypatch):
        # a plausible porting bug: float64 input accumulated in float32 (errors ~1e-6)
        ops = torch_adapter.cpu_sync_ops()

        def stats_in_float32(input, eps):
            mean, invstd = ops["batch_norm_stats"](input.float(), eps)
            return mean.double(), invstd.double()

        monkeypatch.setattr(
            torch_adapter, "cpu_sync_ops", lambda: {**ops, "batch_norm_stats": stats_in_float32}
        )
        with pytest.raises(AssertionError, match="Mismatched elements"):
            self._compare("float64", 1e-14, (6, 2), (1, 5))

    @staticmethod
    def _compare(dtype, rtol, shape, splits):
        import torch

        g = torch.Generator().manual_seed(7)
        dt = getattr(torch, dtype)
        c = shape[1]
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 50).to(dt)
        dy = torch.randn(shape, generator=g, dtype=dt)
        w, b = torch.rand(c, dtype=dt) + 0.5, torch.randn(c, dtype=dt)
        args = (w, b, torch.randn(c, dtype=dt), torch.rand(c, dtype=dt) + 0.5, 0.1, 1e-5, dy)
        ours = _stand_in_sync_bn(
            x, list(splits), *(a.clone() if torch.is_tensor(a) else a for a in args[:4]), *args[4:]
        )
        theirs = _torch_batch_norm(
            x, *(a.clone() if torch.is_tensor(a) else a for a in args[:4]), *args[4:]
        )
        for name, a, t in zip(
            ("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
            ours,
            theirs,
            strict=True,
        ):
            a, t = a.double().numpy(), t.double().numpy()
            scale = np.abs(t).max()
            np.testing.assert_allclose(a, t, rtol=0, atol=rtol * scale, err_msg=name)

    def test_negative_control_unsynchronized_ranks_differ(self):
        import torch
        import torch.nn.functional as F

        x = torch.tensor([[0.0], [1.0], [10.0], [12.0]], dtype=torch.float64)
        w, b, dy = torch.ones(1, dtype=x.dtype), torch.zeros(1, dtype=x.dtype), torch.ones_like(x)
        synced = _stand_in_sync_bn(
            x,
            [2, 2],
            w,
            b,
            torch.zeros(1, dtype=x.dtype),
            torch.ones(1, dtype=x.dtype),
            0.1,
            1e-5,
            dy,
        )[0]
        local = torch.cat(
            [F.batch_norm(p, None, None, w, b, training=True, eps=1e-5) for p in torch.split(x, 2)]
        )
        assert (synced - local).abs().max() > 0.5


@needs_torch
class TestTorchAdapter:
    def test_conform_torch_passes_and_fingerprints_the_torch_preset(self, tmp_path, capsys):
        out = tmp_path / "torch.md"
        assert cli_main(["conform", "torch", "--cases", "3", "--out", str(out)]) == 0
        assert "12 pass, 0 fail, 0 error, 0 not expressible of 12 cases" in capsys.readouterr().out
        report = json.loads(out.with_suffix(".json").read_text())
        assert report["consistent_presets"] == ["torch"]
        fp = {k: t["value"] for k, t in report["fingerprint"].items()}
        assert fp["running_var"] == "unbiased_global" and fp["weighting"] == "count"
        assert fp["momentum_meaning"] == "update" and fp["param_grads"] == "local"
        assert {r["verdict"] for r in report["cases"]} == {"pass"}
        assert "CPU stand-ins for torch's CUDA sync ops" in out.read_text()

    def test_checker_rejects_torch_where_another_convention_is_expected(self):
        probe = probe_cases("torch")["running_stats"]
        cases = {
            "torch_rules": probe,
            # the same step expected under the reference rules (biased running variance);
            # momentum 0.75 "retain" is the batch weight 0.25 torch is given
            "reference_rules": dataclasses.replace(probe, convention="reference", momentum=0.75),
        }
        outcomes = adapters.run("torch", cases, timeout=120)
        report = adapters.check_outcomes(cases, outcomes)
        failed = {(n, q.quantity) for n, qs in report.checks.items() for q in qs if not q.passed}
        assert failed == {("reference_rules", "running_var")}
        # the running means agree: the momentum was handed over in torch's meaning
        np.testing.assert_array_equal(
            outcomes["torch_rules"].outputs[0]["running_mean"],
            outcomes["reference_rules"].outputs[0]["running_mean"],
        )


@needs_flax
def test_conform_flax_fingerprints_equal_weighting(tmp_path):
    out = tmp_path / "flax.md"
    cli_main(["conform", "flax", "--cases", "2", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["fingerprint"]["weighting"]["value"] == "equal"
    assert not report["unexplained_failures"]


@needs_keras
def test_conform_keras_fingerprints_count_weighting(tmp_path):
    out = tmp_path / "keras.md"
    cli_main(["conform", "keras", "--cases", "2", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["fingerprint"]["weighting"]["value"] == "count"
    assert not report["unexplained_failures"]


def test_adapters_and_conform_import_no_framework():
    code = (
        "import sys, refsyncbn.adapters.torch, refsyncbn.adapters.flax, "
        "refsyncbn.adapters.keras, refsyncbn.cli.conform\n"
        "print([m for m in ('torch', 'jax', 'flax', 'tensorflow', 'keras') "
        "if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
