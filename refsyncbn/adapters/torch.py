"""torch adapter: ``torch.nn.SyncBatchNorm`` over gloo, one process per rank.

The workers (``python -m refsyncbn.adapters.torch CASES_DIR OUT_DIR`` with
``RANK``/``WORLD_SIZE``/``MASTER_PORT``; started by
:func:`refsyncbn.adapters.run`) join one gloo process group on 127.0.0.1
(``GLOO_SOCKET_IFNAME=lo``), build each case's process groups with
``dist.new_group``, and run ``nn.SyncBatchNorm`` forward and backward on their
slice of the batch.

Where CUDA is available the workers run on ``cuda:{rank % device_count}``
over NCCL with torch's own kernels (:func:`label` says which ran). On CPU
torch refuses SyncBatchNorm (its device check) and has no CPU kernels
for the five ops the autograd function calls. :func:`cpu_sync_ops` supplies
CPU stand-ins that follow the CUDA kernels (aten/src/ATen/native/cuda/
Normalization.cuh): per-rank mean and ``invstd`` accumulated in float32 for
float32/float16 input (float64 for float64) without cancellation, merged over
ranks by count with the kernel's sequential parallel-variance update (the
running variance unbiased with the global count), and the elementwise forward
and backward in that precision. Everything else (empty-rank handling, the
one-value check, the all-gather, momentum, buffers, autograd) is torch's own
code. Reports label the result "CPU stand-ins for torch's CUDA sync ops";
``tests/test_adapters.py`` checks the stand-ins against torch's own CPU
``F.batch_norm`` on the whole batch.

Channel-last formats are handed to torch as ``x.movedim(-1, 1)`` (a
channels_last tensor, as torch users write it); masks are not expressible.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from datetime import timedelta

from ..layouts import get_layout
from ._worker import cases_in, momentum_for, save, save_error

__all__ = [
    "DEVIATIONS",
    "LABEL",
    "PRESET",
    "VARIANCE",
    "commands",
    "cpu_sync_ops",
    "known_deviation",
    "label",
    "main",
    "unsupported",
]

PRESET = "torch"
#: The variance algorithm of the kernels (for the checker's error model).
VARIANCE = "stable"
LABEL = (
    "torch.nn.SyncBatchNorm over gloo (2+ processes, loopback), "
    "CPU stand-ins for torch's CUDA sync ops"
)
_CUDA_LABEL = "torch.nn.SyncBatchNorm over NCCL on CUDA devices, torch's own kernels"
#: Documented ways in which torch differs from the ``torch`` preset or the oracle, each with
#: the outputs it can explain (none found).
DEVIATIONS: dict = {}
_GROUP_TIMEOUT = timedelta(seconds=30)
SYNC_OPS = (
    "batch_norm_stats",
    "batch_norm_gather_stats_with_counts",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
)


def label() -> str:
    """What runs here: :data:`LABEL` on CPU, torch's own kernels where CUDA is available."""
    import torch

    return _CUDA_LABEL if torch.cuda.is_available() else LABEL


def unsupported(case) -> str:
    """Why torch cannot state ``case`` ('' when it can)."""
    if case.mask is not None:
        return "nn.SyncBatchNorm takes no mask"
    return ""


def known_deviation(case, variant="") -> str:
    """The entry of :data:`DEVIATIONS` that explains a failure on ``case`` ('' if none)."""
    return ""


def commands(cases_dir, out_dir, worlds) -> list:
    """One worker per rank of the largest world: ``(argv for python -m, extra environment)``."""
    world = max(worlds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    return [
        (["refsyncbn.adapters.torch", str(cases_dir), str(out_dir)], {**env, "RANK": str(r)})
        for r in range(world)
    ]


def cpu_sync_ops() -> dict:
    """CPU versions of the five CUDA-only ops of ``nn.SyncBatchNorm``, by ``torch`` name.

    Each takes and returns what the CUDA op does (see the module docstring).
    """
    import torch

    def acc(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def rows(t, dtype):
        """``(N, C, ...)`` as ``(C, N * L)`` in ``dtype``."""
        return (
            t.reshape(t.shape[0], t.shape[1], -1).transpose(0, 1).reshape(t.shape[1], -1).to(dtype)
        )

    def per_channel(v, like):
        return v.reshape(1, -1, *([1] * (like.dim() - 2)))

    def batch_norm_stats(input, eps):
        v = rows(input, acc(input.dtype))
        mean = v.mean(1)
        var = ((v - mean[:, None]) ** 2).mean(1)
        # the kernel's InvStd: 0 where both the variance and eps are 0
        invstd = torch.where(
            (var == 0) & (eps == 0), torch.zeros_like(var), 1 / torch.sqrt(var + eps)
        )
        return mean, invstd

    def batch_norm_gather_stats_with_counts(
        input, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts
    ):
        a = mean_all.dtype
        avg = torch.zeros(mean_all.shape[1], dtype=a)
        var_n = torch.zeros_like(avg)
        n = 0
        for m, inv, count in zip(mean_all, invstd_all, counts.tolist(), strict=True):
            v = (1 / inv * (1 / inv) - eps) * count
            factor = torch.tensor(1.0 / (n + count), dtype=a)
            var_n = var_n + v + (avg - m) * (avg - m) * n * count * factor
            avg = n * factor * avg + count * factor * m
            n += count
        invstd = 1 / torch.sqrt(var_n / n + eps)
        mom = torch.tensor(momentum, dtype=a)
        if running_mean is not None:
            running_mean.copy_((1 - mom) * running_mean.to(a) + mom * avg)
        if running_var is not None:
            running_var.copy_((1 - mom) * running_var.to(a) + mom * (var_n / (n - 1)))
        return avg, invstd

    def batch_norm_elemt(input, weight, bias, mean, invstd, eps):
        a = mean.dtype
        y = (input.to(a) - per_channel(mean, input)) * per_channel(invstd, input)
        if weight is not None:
            y = y * per_channel(weight.to(a), input)
        if bias is not None:
            y = y + per_channel(bias.to(a), input)
        return torch.empty_like(input).copy_(y)

    def batch_norm_backward_reduce(
        grad_output, input, mean, invstd, weight, input_g, weight_g, bias_g
    ):
        a = mean.dtype
        dy = rows(grad_output, a)
        sum_dy = dy.sum(1)
        sum_dy_xmu = (dy * (rows(input, a) - mean[:, None])).sum(1)
        pdtype = input.dtype if weight is None else weight.dtype
        empty = torch.empty(0, dtype=a)
        return (
            sum_dy if input_g else empty,
            sum_dy_xmu if input_g else empty,
            (sum_dy_xmu * invstd).to(pdtype) if weight_g else empty.to(pdtype),
            sum_dy.to(pdtype) if bias_g else empty.to(pdtype),
        )

    def batch_norm_backward_elemt(
        grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count
    ):
        a = mean.dtype
        norm = 1 / torch.tensor(float(count.sum()), dtype=a)
        f1 = invstd * invstd * sum_dy_xmu * norm
        f2 = invstd if weight is None else weight.to(a) * invstd
        gi = (
            grad_output.to(a)
            - per_channel(sum_dy * norm, input)
            - (input.to(a) - per_channel(mean, input)) * per_channel(f1, input)
        ) * per_channel(f2, input)
        return torch.empty_like(input).copy_(gi)

    ops = (
        batch_norm_stats,
        batch_norm_gather_stats_with_counts,
        batch_norm_elemt,
        batch_norm_backward_reduce,
        batch_norm_backward_elemt,
    )
    return {f.__name__: f for f in ops}


@contextlib.contextmanager
def _on_cpu():
    """The stand-ins in place of torch's ops, and SyncBatchNorm's device check passed for CPU."""
    import torch

    saved = {name: getattr(torch, name) for name in SYNC_OPS}
    device_name = torch._C._get_privateuse1_backend_name
    for name, fn in cpu_sync_ops().items():
        setattr(torch, name, fn)
    # SyncBatchNorm.forward accepts inputs whose device type is "cuda", "hpu", "xpu"
    # or the PrivateUse1 backend's name: report "cpu" as that name, inside this block only
    torch._C._get_privateuse1_backend_name = lambda: "cpu"
    try:
        yield
    finally:
        torch._C._get_privateuse1_backend_name = device_name
        for name, fn in saved.items():
            setattr(torch, name, fn)


def _run_case(case, rank, group, device):
    """This rank's outputs of ``nn.SyncBatchNorm`` on its slice of ``case``."""
    import numpy as np
    import torch

    shard = case.shard(rank)
    last = get_layout(case.data_format).channels_last
    x = torch.from_numpy(np.array(shard["x"])).to(device).requires_grad_(case.dy is not None)
    dtype, c = x.dtype, case.running_mean.shape[0]
    bn = torch.nn.SyncBatchNorm(
        c,
        eps=case.eps,
        momentum=momentum_for(case, "update"),
        affine=case.weight is not None,
        process_group=group,
        device=device,
        dtype=dtype,
    )
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(case.running_mean))
        bn.running_var.copy_(torch.from_numpy(case.running_var))
        if case.weight is not None:
            bn.weight.copy_(torch.from_numpy(case.weight))
            bn.bias.copy_(torch.from_numpy(case.bias))
    bn.train(case.training)
    with _on_cpu() if device == "cpu" else contextlib.nullcontext():
        y = bn(x.movedim(-1, 1) if last else x)
        y = y.movedim(1, -1) if last else y
        if case.dy is not None:
            y.backward(torch.from_numpy(np.array(shard["dy"])).to(device))
    out = {
        "y": y.detach().cpu().numpy(),
        "running_mean": bn.running_mean.cpu().numpy(),
        "running_var": bn.running_var.cpu().numpy(),
    }
    if case.dy is not None:

        def grad(t):  # torch leaves None where the gradient is zero (an empty rank)
            return (torch.zeros_like(t) if t.grad is None else t.grad).detach().cpu().numpy()

        out["dx"] = grad(x)
        if case.weight is not None:
            out.update(dweight=grad(bn.weight), dbias=grad(bn.bias))
    return out


def main(argv) -> int:
    """Worker: run every case of ``CASES_DIR`` as rank ``$RANK``, write ``OUT_DIR/<case>/``."""
    import torch
    import torch.distributed as dist

    cases_dir, out_dir = argv
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    device = "cpu"
    if torch.cuda.is_available():  # torch's own kernels, as in training
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device != "cpu" else "gloo", rank=rank, world_size=world, timeout=_GROUP_TIMEOUT
    )
    try:
        for name, case in cases_in(cases_dir):
            groups = case.groups or [list(range(case.world_size))]
            made = [dist.new_group(g, timeout=_GROUP_TIMEOUT) for g in groups]  # collective
            mine = [pg for g, pg in zip(groups, made, strict=True) if rank in g]
            if mine:
                try:
                    save(out_dir, name, rank, _run_case(case, rank, mine[0], device))
                except Exception as exc:  # the framework's verdict on this case
                    save_error(out_dir, name, rank, exc)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
