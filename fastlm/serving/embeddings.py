"""Sentence embeddings for the server: a BERT-style folder (sentence-transformers layout) run by
fastlm.models.Bert, with concurrent requests batched into one forward.

Pooling and normalization come from the folder's sentence-transformers config: `modules.json` lists
the modules (Transformer, Pooling, Normalize), `1_Pooling/config.json` (or the Pooling module's path)
the pooling mode, `sentence_bert_config.json` the maximum sequence length. A plain BERT folder without
them gets mean pooling, unnormalized.

The batcher is one asyncio task: it takes every request that is waiting (up to a token budget), pads
them into one batch, runs the forward in a worker thread and hands each request its vectors. While a
forward runs new requests queue up, so under load the batches grow by themselves.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from fastlm.serving.tokenizer import read_json

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


@dataclass
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False
    max_seq_length: Optional[int] = None
    dimension: Optional[int] = None


def read_pooling_config(path: str) -> PoolingConfig:
    """Pooling mode, normalization and max length from a sentence-transformers folder."""
    cfg = PoolingConfig()
    modules = read_json(os.path.join(path, "modules.json"))
    pool_dir = os.path.join(path, "1_Pooling")
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules]
        cfg.normalize = any(t.endswith(".Normalize") for t in types)
        for m in modules:
            if str(m.get("type", "")).endswith(".Pooling"):
                pool_dir = os.path.join(path, m.get("path") or "1_Pooling")
    pool = read_json(os.path.join(pool_dir, "config.json"))
    if pool is not None:
        modes = [m for m in POOLING_MODES if pool.get(f"pooling_mode_{m}_tokens") or pool.get(f"pooling_mode_{m}")]
        known = {f"pooling_mode_{m}_tokens" for m in POOLING_MODES} | {"pooling_mode_cls_token"}
        others = [k for k, v in pool.items() if k.startswith("pooling_mode") and v and k not in known]
        if others:
            raise ValueError(f"{pool_dir}/config.json: pooling {others} is not supported "
                             f"(fastlm serves {', '.join(POOLING_MODES)})")
        if pool.get("pooling_mode_cls_token"):
            modes.insert(0, "cls")
        if len(modes) != 1:
            raise ValueError(f"{pool_dir}/config.json: exactly one pooling mode is supported, got {modes or 'none'}")
        cfg.mode = modes[0]
        cfg.dimension = pool.get("word_embedding_dimension")
    st = read_json(os.path.join(path, "sentence_bert_config.json"))
    if st is not None and st.get("max_seq_length"):
        cfg.max_seq_length = int(st["max_seq_length"])
    return cfg


def pool(hidden: torch.Tensor, mask: torch.Tensor, cfg: PoolingConfig) -> torch.Tensor:
    """hidden (B, S, H), mask (B, S) 1 = real token -> (B, H) fp32."""
    h = hidden.float()
    m = mask.to(h.dtype)[..., None]
    if cfg.mode == "cls":
        out = h[:, 0]
    elif cfg.mode == "max":
        out = h.masked_fill(m == 0, float("-inf")).amax(dim=1)
    else:
        s = (h * m).sum(dim=1)
        n = m.sum(dim=1).clamp_min(1e-9)
        out = s / (n if cfg.mode == "mean" else n.sqrt())
    if cfg.normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=-1)
    return out


class EmbeddingModel:
    """A fastlm Bert + its tokenizer + its pooling. `embed(list of id lists)` -> (B, H) fp32 (one padded
    forward)."""

    def __init__(self, path: str, device: str = "cpu", weights: Optional[str] = None,
                 activations: Optional[str] = None):
        from fastlm.models import Bert
        from fastlm.serving.tokenizer import HFTokenizer

        self.path = path
        self.device = torch.device(device)
        self.model = Bert.from_hf(path, device=self.device)
        if weights not in (None, "fp32"):
            import fastlm

            fastlm.quantize(self.model, weights=weights, activations=activations)
        self.tokenizer = HFTokenizer(path)
        self.pooling = read_pooling_config(path)
        s = self.model.settings
        self.vocab_size = s.vocab_size
        self.pad_token_id = s.pad_token_id
        limit = s.max_position_embeddings
        self.max_seq_length = min(limit, self.pooling.max_seq_length or limit)
        self.dimension = s.hidden_size

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    @torch.inference_mode()
    def embed(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        S = max(len(x) for x in batch)
        ids = torch.full((len(batch), S), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), S), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(list(x), dtype=torch.long)
            mask[i, :len(x)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(ids, attention_mask=mask)[0]
        return pool(hidden, mask, self.pooling).cpu()


class EmbeddingBatcher:
    """Batches concurrent `await embed(list of id lists)` calls into padded forwards of at most
    `max_batch_tokens` padded tokens (and `max_batch_size` sequences), sorted by length."""

    def __init__(self, model: EmbeddingModel, max_batch_tokens: int = 16384, max_batch_size: int = 128,
                 metrics=None):
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self.batches_run = 0

    def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="fastlm-embedding-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    async def embed(self, inputs: List[List[int]]) -> List[torch.Tensor]:
        self.start()
        loop = asyncio.get_running_loop()
        futs = []
        for ids in inputs:
            fut = loop.create_future()
            futs.append(fut)
            self._queue.put_nowait((list(ids), fut))
        return list(await asyncio.gather(*futs))

    def _take(self, first) -> list:
        items = [first]
        while not self._queue.empty() and len(items) < self.max_batch_size:
            items.append(self._queue.get_nowait())
        return items

    async def _loop(self) -> None:
        pending: list = []
        while True:
            if not pending:
                pending = self._take(await self._queue.get())
            else:
                pending += self._take(self._queue.get_nowait()) if not self._queue.empty() else []
            pending = [it for it in pending if not it[1].done()]       # cancelled by a gone client
            if not pending:
                continue
            pending.sort(key=lambda it: len(it[0]))
            batch, longest = [], 0
            for it in pending:                                         # shortest first, up to the budget
                longest = max(longest, len(it[0]))
                if batch and (longest * (len(batch) + 1) > self.max_batch_tokens or len(batch) >= self.max_batch_size):
                    break
                batch.append(it)
            pending = pending[len(batch):]
            try:
                out = await asyncio.to_thread(self.model.embed, [it[0] for it in batch])
            except Exception as e:                                     # every caller of this batch gets it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches_run += 1
            if self.metrics is not None:
                self.metrics.embedding_batch.observe(len(batch))
            for i, (_, fut) in enumerate(batch):
                if not fut.done():
                    fut.set_result(out[i])
