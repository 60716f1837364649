"""fastlm.quantize's quality against fp32, the figures of issue 12 (fastlm/bench/quant_quality.py):

- MiniLM-L6 (real weights) sentence embeddings over 72 fixed sentences: cosine mean / min and hidden
  max / mean error, for int8 per channel (target: mean >= 0.999, min >= 0.995), int8 group_size 64,
  bf16, and CTranslate2 int8 on the same model.
- GPT-2 small, random weights: prefill logits max / mean error, and greedy token agreement with fp32
  over 8 prompts x 64 new tokens, for int8, bf16 and CTranslate2 int8 (random-weight logits are nearly
  tied: the median top-2 gap is printed beside the agreement).

    .venv/bin/python scripts/quant_quality.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from fastlm.bench import quant_quality as qq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    res = {"minilm": {}, "gpt2": {}}
    mini = qq.minilm_hf()
    for label, kw in (("int8", {}), ("int8 group_size=64", {"group_size": 64}), ("bf16", {})):
        res["minilm"][f"fastlm {label}"] = qq.minilm_quality(label.split()[0], hf=mini, **kw)
    gpt = qq.gpt2_random()
    for w in ("int8", "bf16"):
        res["gpt2"][f"fastlm {w}"] = qq.gpt2_quality(w, new_tokens=args.new_tokens, hf=gpt)
    peer = qq.peer_quality(hf_gpt2=gpt, hf_minilm=mini, new_tokens=args.new_tokens)
    if peer:
        res["minilm"]["ctranslate2 int8"] = peer["minilm"]
        res["gpt2"]["ctranslate2 int8"] = peer["gpt2"]

    print(f"MiniLM-L6 sentence embeddings vs fp32 ({len(qq.SENTENCES)} sentences; target int8: cosine mean >= "
          f"0.999, min >= 0.995)")
    for k, r in res["minilm"].items():
        print(f"  {k:22s} cosine mean {r['cos_mean']:.6f} min {r['cos_min']:.6f}   hidden max err "
              f"{r['hidden_max_err']:.4f} mean {r['hidden_mean_err']:.5f}")
    print(f"GPT-2 small random weights vs fastlm fp32 (8 prompts x {args.new_tokens} greedy tokens)")
    for k, r in res["gpt2"].items():
        gap = f"  (fp32 median top-2 logit gap {r['logit_top2_gap_median']:.2e})" if "logit_top2_gap_median" in r \
            else ""
        print(f"  {k:22s} logits max err {r['logits_max_err']:.4f} mean {r['logits_mean_err']:.5f}   tokens "
              f"agree {r['agree_all'] * 100:.1f}% (before first miss {r['agree_prefix'] * 100:.1f}%, rows identical "
              f"{r['rows_identical']}/{r['rows']}){gap}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
