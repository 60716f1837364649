"""Argument checks shared by the functional ops: each raises TypeError (wrong type/dtype) or
ValueError (wrong shape/device/value) naming the argument, before any kernel is launched."""
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


def rows(t: Tensor, n: int) -> Tensor:
    """View t as (M, n) rows with a contiguous last dim (copies only when it must)."""
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def column_major(w: Tensor) -> bool:
    """A 2-D weight stored transposed: its .t() is contiguous, itself is not (GPT-2's Conv1D weight,
    stored (in, out), seen as (out, in) through a .t() view)."""
    return not w.is_contiguous() and w.t().is_contiguous()
