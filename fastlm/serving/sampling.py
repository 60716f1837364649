"""Per-sequence token choice for the serving engine: greedy (argmax) or sampling with each sequence's
own torch.Generator (temperature -> top_k -> top_p -> multinomial, the order and semantics of
fastlm.generate / transformers' logits warpers), and the stop checks (max_tokens, eos, stop token
ids, stop strings through a decode callable).

A row's choice depends only on its own logits and its own generator: with batch-invariant logits
(model_runner) a request draws the same tokens whatever else shares its steps.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from fastlm.generation import process_logits  # the one implementation, shared with fastlm.generate


def sample_rows(logits: Tensor, seqs: Sequence) -> List[int]:
    """One token per row of logits (R, V) for seqs[r] (each with .params and .generator)."""
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
    out = [0] * len(seqs)
    if greedy:
        picked = logits[greedy].argmax(-1).tolist()
        for i, t in zip(greedy, picked):
            out[i] = t
    for i, s in enumerate(seqs):
        p = s.params
        if p.temperature == 0:
            continue
        probs = process_logits(logits[i], p.temperature, p.top_k, p.top_p).softmax(-1)
        out[i] = int(torch.multinomial(probs, 1, generator=s.generator))
    return out


def make_generator(seed: Optional[int], index: int, device) -> torch.Generator:
    """The sequence's RNG: seeded with seed + index, or from the default generator when seed is None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    else:
        g.manual_seed(seed + index)
    return g


def check_stop(output_ids: List[int], params, eos_token_id: Optional[int],
               decode: Optional[Callable[[List[int]], str]]) -> Optional[str]:
    """The finish reason after the last token of output_ids was appended: "stop" (eos unless
    ignore_eos, a stop token id, or a stop string now in the decoded output), "length" (max_tokens),
    else None."""
    t = output_ids[-1]
    if eos_token_id is not None and t == eos_token_id and not params.ignore_eos:
        return "stop"
    if params.stop_token_ids and t in params.stop_token_ids:
        return "stop"
    if params.stop_strings and decode is not None:
        # only a stop string that ends in the newest token's text can be new: decode a tail long
        # enough to hold the longest stop string (every token decodes to >= 1 char, bar partial UTF-8)
        longest = max(len(s) for s in params.stop_strings)
        tail = decode(output_ids[-(longest + 8):])
        if any(s in tail for s in params.stop_strings):
            return "stop"
    if len(output_ids) >= params.max_tokens:
        return "length"
    return None
