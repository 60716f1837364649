"""fastlm.nn.StaticKVCache: preallocated per-layer key/value buffers with per-row lengths.

Every buffer is (batch, kv_heads, max_seq, head_dim) and never moves, so a decode step that writes
into it can be captured in a CUDA graph. Row b holds its tokens at positions [0, lengths[b]); rows
of a batch may have different lengths (left-padded prompts are stored without their padding).
"""
from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache(torch.nn.Module):
    """keys[l], values[l]: (batch, kv_heads, max_seq, head_dim); lengths: (batch,) int32.

    A decode step writes each layer's new keys/values at each row's own position (`append`), reads
    `next_lengths()` as the attention lengths, and calls `advance()` once all layers are done.
    Buffers are registered as non-persistent (not in state_dict)."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        for name, v in (("n_layers", n_layers), ("batch", batch), ("kv_heads", kv_heads), ("max_seq", max_seq),
                        ("head_dim", head_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"StaticKVCache: {name} must be a positive int, got {v!r}")
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"StaticKVCache: dtype must be a floating-point dtype, got {dtype}")
        self.n_layers, self.batch, self.kv_heads = n_layers, batch, kv_heads
        self.max_seq, self.head_dim = max_seq, head_dim
        shape = (n_layers, batch, kv_heads, max_seq, head_dim)
        # Positions past a row's length are never read by the CPU kernels: no zero fill there (GPT-2
        # small, 8 x 96 positions: 56 MB, 9 ms of a ~0.8 s generate call). GPU kernels may load a
        # masked tail, so CUDA buffers start zeroed (cheap there).
        alloc = torch.empty if torch.device(device or "cpu").type == "cpu" else torch.zeros
        self.register_buffer("k", alloc(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", alloc(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(batch, dtype=torch.int32, device=device), persistent=False)
        # flat row index of (b, h, position 0) in a layer's (batch * kv_heads * max_seq, head_dim) view
        rows, heads = torch.arange(batch, device=device), torch.arange(kv_heads, device=device)
        base = (rows[:, None] * kv_heads + heads[None, :]) * max_seq
        self.register_buffer("_base", base, persistent=False)

    def keys(self, layer: int) -> Tensor:
        return self.k[layer]

    def values(self, layer: int) -> Tensor:
        return self.v[layer]

    def reset(self) -> None:
        """Empty every row (the buffers are kept; stale values are never read past `lengths`)."""
        self.lengths.zero_()

    def next_lengths(self) -> Tensor:
        """lengths + 1: the attention lengths of a decode step, once its token has been appended."""
        return self.lengths + 1

    def check_room(self, n: int = 1) -> None:
        """Raise if a row cannot take n more tokens (a host read of the lengths: skipped while a CUDA
        graph is being captured or under torch.compile)."""
        if (self.k.is_cuda and torch.cuda.is_current_stream_capturing()) or torch.compiler.is_compiling():
            return
        if self.batch and int(self.lengths.max()) + n > self.max_seq:
            raise ValueError(f"StaticKVCache: a row is full (max_seq={self.max_seq})")

    def append(self, layer: int, key: Tensor, value: Tensor, check: bool = True, index: Tensor | None = None) -> None:
        """Write one token per row, key/value (batch, kv_heads, head_dim), at position lengths[b] of
        row b (in place). check=False skips the room check (the caller ran check_room once a step);
        index: step_index() computed once for the step (default: computed here)."""
        self._check_kv("append", key, (self.batch, self.kv_heads, self.head_dim))
        self._check_kv("append", value, (self.batch, self.kv_heads, self.head_dim))
        if check:
            self.check_room()
        idx = self.step_index() if index is None else index            # (batch * kv_heads,)
        D = self.head_dim
        self.k[layer].view(-1, D).index_copy_(0, idx, key.reshape(-1, D).to(self.k.dtype))
        self.v[layer].view(-1, D).index_copy_(0, idx, value.reshape(-1, D).to(self.v.dtype))

    def step_index(self) -> Tensor:
        """The flat row indices (batch * kv_heads,) of every row's next position in a layer's
        (batch * kv_heads * max_seq, head_dim) view: the same for all layers of a decode step, so a
        step computes it once and passes it to append(..., index=)."""
        return (self._base + self.lengths.long()[:, None]).view(-1)

    def advance(self, n: int = 1) -> None:
        """Every row grows by n tokens (after all layers appended)."""
        self.lengths.add_(n)

    def fill(self, layer: int, key: Tensor, value: Tensor, start: Tensor | None = None) -> None:
        """Prefill: key/value (batch, kv_heads, S, head_dim). Row b's tokens start[b]: (left padding)
        are stored at positions [0, S - start[b]); lengths are set by `set_lengths`."""
        S = key.shape[2]
        if S > self.max_seq:
            raise ValueError(f"StaticKVCache.fill: {S} positions do not fit max_seq={self.max_seq}")
        self._check_kv("fill", key, (self.batch, self.kv_heads, S, self.head_dim))
        self._check_kv("fill", value, (self.batch, self.kv_heads, S, self.head_dim))
        if start is not None:
            # shift each row left by its padding: position j takes token j + start[b] (clamped; the
            # clamped tail lies beyond the row's length and is never read)
            idx = (torch.arange(S, device=key.device)[None, :] + start.to(key.device).long()[:, None]).clamp_(max=S - 1)
            idx = idx[:, None, :, None].expand(self.batch, self.kv_heads, S, self.head_dim)
            key, value = key.gather(2, idx), value.gather(2, idx)
        self.k[layer, :, :, :S] = key
        self.v[layer, :, :, :S] = value

    def set_lengths(self, lengths: Tensor) -> None:
        self.lengths.copy_(lengths)

    def _check_kv(self, where: str, t: Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"StaticKVCache.{where}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
