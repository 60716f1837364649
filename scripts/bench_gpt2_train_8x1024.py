"""Usage: python scripts/bench_gpt2_train_8x1024.py [out.json]. gpt2 train step 8x1024 on CPU, one contender alive at a time (the bench case holds all models at
once and needs > 24 GB here). Same models, ids and step as fastlm/bench/cases_models.py."""
import gc
import json
import sys
import time
import warnings

import torch
import fastlm
from fastlm.bench.cases_models import _configs
from fastlm.integrations.hf import PatchWarning
from transformers import GPT2LMHeadModel

B, S = 8, 1024
g = torch.Generator().manual_seed(1)
res = {}
for name in ("hf eager", "hf sdpa", "patched"):
    cfg = _configs("gpt2", S)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = GPT2LMHeadModel(cfg)
    if name == "hf sdpa":
        m.set_attn_implementation("sdpa")
    if name == "patched":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PatchWarning)
            fastlm.patch(m)
    m.train(True)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    times, loss = [], None
    for i in range(3):
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        l = m(ids, attention_mask=mask, labels=ids).loss
        l.backward()
        times.append((time.perf_counter() - t0) * 1e3)
        loss = l.item()
    res[name] = {"ms_steps": times, "ms": sorted(times[1:])[0], "loss": loss}
    print(name, [f"{t:.0f}" for t in times], "loss", loss, flush=True)
    del m, l
    gc.collect()
base = res["hf eager"]["ms"]
for k, r in res.items():
    r["speedup"] = base / r["ms"]
    print(f"| gpt2 train step 8x1024 | {k} | {r['ms']:.0f} ms | {r['speedup']:.2f}x | loss {r['loss']:.6f} |")
json.dump({"case": "gpt2 train step 8x1024", "note": "best of 2 timed steps after 1 warm-up, one model alive at a time",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "results": res},
          open(sys.argv[1] if len(sys.argv) > 1 else "gpt2_train_8x1024.json", "w"), indent=1)
