"""linear_argmax: argmax over the output features of a linear layer without reading most of its weight
in fp32 -- the greedy pick of a decode step (GPT-2 small's LM head is 50257 x 768, ~30% of the
weights a step reads).

`LinearArgmaxScreen.build(weight)` makes, once, an int8 copy of the weight with per-row scales and a
per-row error bound; `linear_argmax(input, weight, screen)` scans the int8 copy, keeps the rows
whose logit could still be the largest (the bound is rigorous: csrc/cpu/linear_argmax.cpp), and
recomputes those exactly in fp32. The result equals `ops.linear(x[m:m+1], weight).argmax(-1)`, row
by row, bit for bit -- not an approximation (CPUs without AVX-512 run exactly that). Without a
screen, or off the C++ CPU path (CUDA, fp16/bf16, more than 16 rows), it is
`ops.linear(input, weight).argmax(-1)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastlm import _ext, backends
from fastlm.ops import _checks
from fastlm.ops._impl import bucket, eager_inference, kernel_impl, measurer
from fastlm.ops.linear import linear

OP = "linear_argmax"
_MAX_ROWS = 16
backends.register_op(OP, ("torch", "reference", "cpu"), cpp_ops=("linear_argmax_fwd", "linear_argmax_screen"))


@dataclass(frozen=True)
class LinearArgmaxScreen:
    """An int8 screen of one fp32 weight (N, K): qweight (N, K) int8, scale (N,), slack (N,) (the
    per-row bound of csrc/cpu/linear_argmax.cpp), and the weight it was built from (identity and
    version: an in-place update of the weight makes the screen stale, which linear_argmax rejects)."""

    qweight: Tensor
    scale: Tensor
    slack: Tensor
    weight_ptr: int
    weight_version: int
    weight_shape: tuple

    @classmethod
    def build(cls, weight: Tensor) -> "LinearArgmaxScreen":
        _checks.tensor(OP, "weight", weight)
        if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"fastlm.ops.{OP}: a screen is built from a 2-D float32 CPU weight, got "
                             f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
        if not _ext.has_kernel("linear_argmax_screen", "CPU"):
            raise backends.BackendUnavailableError(
                f"fastlm.ops.{OP}: the screen needs the C++ extension: {_ext.error() or 'fastlm._C lacks it'}")
        with torch.no_grad():
            q, scale, slack = torch.ops.fastlm_C.linear_argmax_screen(weight.detach())
        return cls(q, scale, slack, weight.data_ptr(), weight._version, tuple(weight.shape))

    def matches(self, weight: Tensor) -> bool:
        return (weight.data_ptr() == self.weight_ptr and weight._version == self.weight_version
                and tuple(weight.shape) == self.weight_shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.slack))


def _supports(x: Tensor, weight: Tensor):
    def check(backend: str) -> str | None:
        if backend == "reference" or backend == "torch":
            return None
        if x.dtype != torch.float32 or weight.dtype != torch.float32:
            return f"dtype {x.dtype} (the screened kernel takes float32)"
        if x.shape[0] > _MAX_ROWS:
            return f"{x.shape[0]} rows (the screened kernel takes at most {_MAX_ROWS})"
        return None
    return check


def _key(x: Tensor, weight: Tensor) -> tuple:
    return (x.dtype, weight.dtype, bucket(x.shape[0]), weight.shape[0], weight.shape[1])


def _logit_check(x: Tensor, weight: Tensor):
    """The parity rule for picked indices: the exact (fp64) logit at a backend's pick must be as close
    to the row's largest as torch's pick is, within 2x plus the fp32 floor."""
    def check(outputs, oracle, torch_outputs) -> str | None:
        logits = x.double() @ weight.double().t()
        best = logits.max(-1).values
        got = logits.gather(-1, outputs[0].view(-1, 1)).view(-1)
        ref = logits.gather(-1, torch_outputs[0].view(-1, 1)).view(-1)
        tol = 2 * (best - ref).abs().max().item() + backends.ATOL[torch.float32] * max(1.0, best.abs().max().item())
        gap = (best - got).abs().max().item() if got.numel() else 0.0
        return None if gap <= tol else f"picked logits {gap:.3e} below the row's largest (torch's: within {tol:.3e})"
    return check


def _run(x: Tensor, weight: Tensor, qweight: Tensor, scale: Tensor, slack: Tensor) -> Tensor:
    backend = backends.select(OP, x.device, _supports(x, weight), key=_key(x, weight))
    if backend in ("reference", "torch"):
        return linear(x, weight).argmax(-1)
    return kernel_impl(backend, "linear_argmax_fwd", "")(x, weight, qweight, scale, slack)


@torch.library.custom_op("fastlm::linear_argmax_fwd", mutates_args=())
def linear_argmax_fwd(x: Tensor, weight: Tensor, qweight: Tensor, scale: Tensor, slack: Tensor) -> Tensor:
    """x (M, K) with a contiguous last dim, weight (N, K), its screen (qweight, scale, slack) -> (M,) int64."""
    return _run(x, weight, qweight, scale, slack)


@linear_argmax_fwd.register_fake
def _(x, weight, qweight, scale, slack):
    return x.new_empty((x.shape[0],), dtype=torch.long)


def _check_screen_args(op: str, input, weight, screen) -> None:
    _checks.input_and_weight(op, input, weight, min_out=1)
    if screen is not None:
        if not isinstance(screen, LinearArgmaxScreen):
            raise TypeError(f"fastlm.ops.{op}: screen must be a LinearArgmaxScreen, got {type(screen).__name__}")
        if not screen.matches(weight):
            raise ValueError(f"fastlm.ops.{op}: screen was built for another weight (or this weight changed "
                             f"in place since): rebuild it with LinearArgmaxScreen.build(weight)")


def linear_argmax(input: Tensor, weight: Tensor, screen: LinearArgmaxScreen | None = None) -> Tensor:
    """== ops.linear(input, weight).argmax(-1): input (*, K), weight (N, K) -> (*,) int64.

    With a `screen` (LinearArgmaxScreen.build(weight)), float32 CPU inputs of at most 16 rows read
    the weight's int8 copy and recompute only the rows that can win, in fp32: the same index as
    the full product of each row alone (the first largest; NaN counts as the largest)."""
    _check_screen_args(OP, input, weight, screen)
    x2 = _checks.rows(input, weight.shape[1])
    if screen is None:
        out = linear(x2, weight).argmax(-1).view(input.shape[:-1])
        backends._record_last(OP, backends.last_choice("linear"))
        return out
    w = weight if weight.is_contiguous() else weight.contiguous()
    backend = backends.select(OP, x2.device, _supports(x2, w), key=_key(x2, w), check=_logit_check(x2, w),
                              measure=measurer(lambda x_: linear_argmax(x_, weight, screen), (x2,), False))
    if backend == "torch":
        backends._record_last(OP, backend)
        return torch.nn.functional.linear(x2, weight).argmax(-1).view(input.shape[:-1])
    args = (x2, w, screen.qweight, screen.scale, screen.slack)
    out = backends.run_on(OP, backend, _run if eager_inference(x2, w) else linear_argmax_fwd, *args)
    return out.view(input.shape[:-1])


# ---- linear_topk_logits: the logits top-k sampling needs, through the same screen ----

OP_TOPK = "linear_topk_logits"
backends.register_op(OP_TOPK, ("torch", "reference", "cpu"), cpp_ops=("linear_topk_logits_fwd", "linear_argmax_screen"))


def _topk_check(k: int):
    """Parity for screened top-k logits: every finite entry within the parity rule of torch's logit,
    and every logit clearly above torch's k-th largest present (not -inf)."""
    def check(outputs, oracle, torch_outputs) -> str | None:
        out, ref, full = outputs[0].double(), oracle[0].double(), torch_outputs[0].double()
        fin = torch.isfinite(out)
        base = (full - ref).abs().max().item()
        floor = backends.ATOL[torch.float32] * max(1.0, ref.abs().max().item())
        err = (out - ref).abs()[fin].max().item() if bool(fin.any()) else 0.0
        if err > 2 * base + floor:
            return f"finite logits off by {err:.3e} (torch's error {base:.3e})"
        kth = full.topk(min(k, full.shape[-1]), -1).values[..., -1:]
        need = full > kth + 2 * base + floor
        if bool((need & ~fin).any()):
            return "a logit above the k-th largest is missing (-inf)"
        return None
    return check


def _run_topk(x: Tensor, weight: Tensor, qweight: Tensor, scale: Tensor, slack: Tensor, k: int) -> Tensor:
    backend = backends.select(OP_TOPK, x.device, _supports(x, weight), key=_key(x, weight))
    if backend in ("reference", "torch"):
        return linear(x, weight)
    return kernel_impl(backend, "linear_topk_logits_fwd", "")(x, weight, qweight, scale, slack, k)


@torch.library.custom_op("fastlm::linear_topk_logits_fwd", mutates_args=())
def linear_topk_logits_fwd(x: Tensor, weight: Tensor, qweight: Tensor, scale: Tensor, slack: Tensor,
                           k: int) -> Tensor:
    """x (M, K), weight (N, K), its screen, k >= 1 -> (M, N): each entry the exact logit or -inf."""
    return _run_topk(x, weight, qweight, scale, slack, k)


@linear_topk_logits_fwd.register_fake
def _(x, weight, qweight, scale, slack, k):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_topk_logits(input: Tensor, weight: Tensor, k: int, screen: LinearArgmaxScreen | None = None) -> Tensor:
    """Logits of input @ weight.T for top-k sampling: (*, N) whose entries are each the logit
    ops.linear computes for that row alone, or -inf; every logit >= the row's k-th largest is there.
    So keeping the k largest (ties included) gives exactly what it gives on ops.linear(input, weight)
    row by row. With a `screen`, float32 CPU inputs of at most 16 rows read the weight's int8 copy and
    compute exactly only the rows that can be in the top k; otherwise (or without a screen) the full
    product."""
    _check_screen_args(OP_TOPK, input, weight, screen)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"fastlm.ops.{OP_TOPK}: k must be an int >= 1, got {k!r}")
    x2 = _checks.rows(input, weight.shape[1])
    if screen is None:
        out = linear(x2, weight).view(*input.shape[:-1], weight.shape[0])
        backends._record_last(OP_TOPK, backends.last_choice("linear"))
        return out
    w = weight if weight.is_contiguous() else weight.contiguous()
    backend = backends.select(OP_TOPK, x2.device, _supports(x2, w), key=_key(x2, w), check=_topk_check(k),
                              measure=measurer(lambda x_: linear_topk_logits(x_, weight, k, screen), (x2,), False))
    if backend == "torch":
        backends._record_last(OP_TOPK, backend)
        return torch.nn.functional.linear(x2, weight).view(*input.shape[:-1], weight.shape[0])
    args = (x2, w, screen.qweight, screen.scale, screen.slack, k)
    out = backends.run_on(OP_TOPK, backend, _run_topk if eager_inference(x2, w) else linear_topk_logits_fwd, *args)
    return out.view(*input.shape[:-1], weight.shape[0])
