"""Argument checks shared by the functional ops: each raises TypeError (wrong type/dtype) or
ValueError (wrong shape/device/value) naming the argument, before any kernel is launched. A call
they reject goes to torch's own function first (`torch_or_raise`): torch's answer where torch
accepts it, the clear error where torch rejects it too."""
from __future__ import annotations

import torch
from torch import Tensor


def tensor(op: str, name: str, t, *, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastlm.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"fastlm.ops.{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return t


def same_device(op: str, name: str, t: Tensor, like: Tensor, like_name: str = "input") -> None:
    if t.device != like.device:
        raise ValueError(f"fastlm.ops.{op}: {name} is on {t.device} but {like_name} is on {like.device}")


def same_dtype(op: str, name: str, t: Tensor, like: Tensor, like_name: str = "input") -> None:
    if t.dtype != like.dtype:
        raise TypeError(f"fastlm.ops.{op}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}")


def shape(op: str, name: str, t: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"fastlm.ops.{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def input_and_weight(op: str, input, weight, min_out: int = 0) -> None:
    """A linear layer's input (*, K) and weight (N, K), N >= min_out: tensors, shapes, same device and
    dtype."""
    tensor(op, "input", input)
    tensor(op, "weight", weight)
    if weight.dim() != 2 or weight.shape[0] < min_out:
        raise ValueError(f"fastlm.ops.{op}: weight must be 2-D (out_features{f' >= {min_out}' if min_out else ''}, "
                         f"in_features), got {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"fastlm.ops.{op}: input's last dim must be weight's in_features {weight.shape[1]}, "
                         f"got input of shape {tuple(input.shape)}")
    same_device(op, "weight", weight, input)
    same_dtype(op, "weight", weight, input)


def rows(t: Tensor, n: int) -> Tensor:
    """View t as (M, n) rows with a contiguous last dim (copies only when it must)."""
    if t.dim() == 2 and t.shape[1] == n and (n <= 1 or t.stride(1) == 1):
        return t                                  # already rows (a reshape costs ~1 us a call)
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def column_major(w: Tensor) -> bool:
    """A 2-D weight stored transposed: its .t() is contiguous, itself is not (GPT-2's Conv1D weight,
    stored (in, out), seen as (out, in) through a .t() view)."""
    return not w.is_contiguous() and w.t().is_contiguous()


def torch_or_raise(op: str, error: Exception, torch_fn, *args, **kwargs):
    """An input fastlm's checks reject: torch's answer where torch's own function accepts it (the
    "torch" backend: broadcast shapes, mixed dtypes torch promotes, ...), else fastlm's clear error
    (TypeError/ValueError naming the argument) rather than torch's."""
    from fastlm import backends

    devices = {a.device for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor) and a.dim() > 0}
    if len(devices) > 1:   # torch propagates a meta argument through a CPU call: not an answer
        raise error
    try:
        out = torch_fn(*args, **kwargs)
    except Exception:  # noqa: BLE001  (torch rejects it too: fastlm's message names the argument)
        raise error from None
    backends._record_last(op, "torch")
    return out
