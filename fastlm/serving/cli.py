"""`fastlm serve`: the OpenAI-compatible HTTP server (fastlm/cli.py calls add_parser and run).

    fastlm serve --model ./gpt2                 # a local Hugging Face GPT-2 folder (its tokenizer too)
    fastlm serve --model ./all-MiniLM-L6-v2     # a BERT sentence-embedding folder: /v1/embeddings
    fastlm serve --random tiny --port 8001      # random weights (tests, speed runs): bytes as tokens
"""
from __future__ import annotations

import json
import os
import sys

WEIGHTS = ("fp32", "bf16", "int8")

# --random presets: GPT2.random("gpt2", seed=seed, **overrides). "tiny" is for tests: a vocabulary of
# the 256 byte values (text round-trips through the byte tokenizer), 256 positions, and its blocks'
# projection weights scaled up 10x (std 0.2): with GPT-2's init a model this small just repeats one
# token, with these its greedy output varies from token to token and from prompt to prompt.
RANDOM_PRESETS = {
    "gpt2": {},
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256, block_weight_scale=10.0),
}


def random_model(name: str, seed: int = 0, dtype=None, device=None):
    """The --random model `name` with weights drawn from `seed` (what `fastlm serve --random` serves)."""
    from fastlm.models import GPT2

    import torch

    if name not in RANDOM_PRESETS:
        raise ValueError(f"unknown random preset {name!r}; known: {sorted(RANDOM_PRESETS)}")
    shape = dict(RANDOM_PRESETS[name])
    scale = shape.pop("block_weight_scale", None)
    model = GPT2.random("gpt2", seed=seed, **shape)
    if scale is not None:
        with torch.no_grad():
            for n, p in model.blocks.named_parameters():
                if n.endswith("weight") and "ln" not in n:
                    p.mul_(scale)
    return model.to(dtype=dtype, device=device)


def add_parser(subparsers):
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, paged KV cache)",
                              description="Serve a GPT-2 (/v1/completions, /v1/chat/completions) or a BERT "
                                          "sentence-embedding model (/v1/embeddings) over HTTP; /v1/models, "
                                          "/health and /metrics (Prometheus) on both.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local Hugging Face folder: GPT-2 (generation) or BERT (embeddings)")
    src.add_argument("--random", choices=sorted(RANDOM_PRESETS), help="a GPT-2 with random weights of this shape "
                     "(token-id prompts; text as UTF-8 bytes)")
    p.add_argument("--seed", type=int, default=0, help="--random: the weights' seed")
    p.add_argument("--weights", choices=WEIGHTS, default="fp32", help="int8 / bf16 weights (fastlm.quantize)")
    p.add_argument("--activations", choices=["int8"], default=None,
                   help="with --weights int8: int8 activations too (W8A8 GEMMs for prefill and batched decode)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the folder's name, or the --random preset)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step at most")
    p.add_argument("--kv-cache-mb", type=float, default=None, help="KV-cache pool size (default: room for "
                   "max-num-seqs full-length sequences, capped at 2048 MB)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    p.add_argument("--max-queue", type=int, default=None,
                   help="sequences waiting beyond --max-num-seqs at most; more get 429 + Retry-After "
                        "(default: unbounded)")
    p.add_argument("--max-embedding-batch-tokens", type=int, default=16384,
                   help="embedding server: padded tokens per batched forward at most")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up request before listening")
    return p


def _model_type(path: str) -> str:
    cfg = os.path.join(path, "config.json")
    try:
        with open(cfg) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise SystemExit(f"fastlm serve: --model {path}: cannot read {cfg}: {e}")


def _fail(msg: str) -> int:
    print(f"fastlm serve: {msg}", file=sys.stderr)
    return 2


def build_state(args):
    """The ServerState of these arguments: loads the model, its tokenizer and the engine or embedder."""
    import torch

    from fastlm.serving.server import ServerState

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastlm serve: --device cuda but no CUDA device is available")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"fastlm serve: --{name.replace('_', '-')} must be >= 1")
    if args.max_queue is not None and args.max_queue < 0:
        raise SystemExit("fastlm serve: --max-queue must be >= 0")
    if args.activations is not None and args.weights != "int8":
        raise SystemExit("fastlm serve: --activations int8 needs --weights int8")
    kind = "gpt2" if args.random else _model_type(args.model)
    name = args.served_model_name or (args.random if args.random else os.path.basename(os.path.normpath(args.model)))
    if kind == "bert":
        from fastlm.serving.embeddings import EmbeddingBatcher, EmbeddingModel

        em = EmbeddingModel(args.model, device=device, weights=args.weights, activations=args.activations)
        state = ServerState(embedder=EmbeddingBatcher(em, max_batch_tokens=args.max_embedding_batch_tokens),
                            served_model_name=name, model_path=args.model)
        state.embedder.metrics = state.metrics
        if not args.no_warmup:
            em.embed([em.encode("warm up")])
        return state
    if kind != "gpt2":
        raise SystemExit(f"fastlm serve: --model {args.model}: model_type {kind!r} (fastlm serves gpt2 for "
                         "generation and bert for embeddings)")
    import fastlm
    from fastlm.serving.engine import Engine
    from fastlm.serving.tokenizer import ByteTokenizer, load_tokenizer

    if args.random:
        model = random_model(args.random, seed=args.seed, device=device)
        tokenizer = ByteTokenizer(model.config.vocab_size)
    else:
        model = fastlm.models.GPT2.from_hf(args.model, device=device)
        tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    if args.weights != "fp32":
        model = fastlm.quantize(model, weights=args.weights, activations=args.activations)
    eos = tokenizer.eos_token_id
    if eos is not None and not 0 <= eos < model.config.vocab_size:
        eos = None
    engine = Engine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    kv_cache_mb=args.kv_cache_mb, block_size=args.block_size,
                    enable_prefix_caching=not args.no_prefix_caching, eos_token_id=eos, decode=tokenizer.decode,
                    max_model_len=args.max_model_len)
    if not args.no_warmup:
        _warm_up(engine)
    return ServerState(engine=engine, tokenizer=tokenizer, served_model_name=name, max_queue=args.max_queue,
                       max_num_seqs=args.max_num_seqs, model_path=args.model or f"random:{args.random}")


def _warm_up(engine) -> None:
    """One short request before listening (first-use kernel choices happen here, not in a client's TTFT)."""
    from fastlm.serving.params import SamplingParams

    rid = engine.add_request([0] * min(8, engine.max_model_len - 2), SamplingParams(max_tokens=2))
    while engine.has_unfinished():
        engine.step()
    engine.abort(rid)


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        return _fail("needs uvicorn and fastapi (pip install fastapi uvicorn prometheus_client)")
    from fastlm.serving.server import create_app

    state = build_state(args)
    app = create_app(state)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGTERM / SIGINT: /health answers 503 and new requests are refused at once; uvicorn
            # closes the listener, waits for every open request, then the lifespan end drains the engine
            state.draining = True
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()     # a drained shutdown exits 0 (uvicorn would re-raise the signal)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=None, lifespan="on")
    server = _Server(config)
    kind = "embeddings" if state.embedder is not None else "generation"
    print(f"fastlm serve: {state.model_name!r} ({kind}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    server.run()
    return 0
