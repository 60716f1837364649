"""The serving engine's request parameters and per-step outputs (fastlm.SamplingParams, RequestOutput).

SamplingParams validates itself on construction: a bad value raises ValueError naming the field, so
the HTTP server can turn it into a 400 before anything is queued.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

MAX_N = 4


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """How one request is generated.

    max_tokens: new tokens at most (finish_reason "length" when reached). temperature 0: greedy
    (argmax); > 0: sampling after temperature -> top_k (0: off) -> top_p (1.0: off), drawn from the
    sequence's own torch.Generator (seeded with seed + index when seed is given). stop: strings that
    end the sequence once they appear in its decoded output (the engine needs a `decode` callable);
    stop_token_ids: token ids that end it ("stop"); the engine's eos_token_id does too unless
    ignore_eos. n: independent sequences (1..4) sharing the prompt."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    n: int = 1
    ignore_eos: bool = False
    stop_strings: List[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (an int), got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be >= 0 (a finite number), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        stop = self.stop
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise ValueError(f"stop must be a string, a list of strings or None, got {stop!r}")
        if any(s == "" for s in stops):
            raise ValueError("stop must not contain an empty string")
        self.stop_strings = stops
        ids = self.stop_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {ids!r}")
            self.stop_token_ids = list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RequestOutput:
    """What one sequence (index 0..n-1 of request_id) produced in one engine step: the new token ids
    (usually one; none for an abort), whether it finished and why ("stop", "length", "abort")."""

    request_id: str
    index: int
    new_token_ids: List[int]
    finished: bool
    finish_reason: Optional[str]
    num_prompt_tokens: int
    num_output_tokens: int
