"""A text sample from an exported transformers directory, with the decoding settings printed next to it.

    python -m minimax_train.tools.sample runs/quickstart/hf [--prompt "def main("] [--max-new-tokens 80]
        [--sample --temperature 0.8 --top-k 40 --top-p 0.95] [--repetition-penalty 1.3]
        [--no-repeat-ngram-size 4] [--seed 0] [--json]

Decoding goes through transformers' own `model.generate` (the GenerationConfig options of the same
names), so what is printed is what a transformers user gets from the export with those settings. The
default is greedy search with `repetition_penalty` and `no_repeat_ngram_size`: deterministic, no seed
involved. After the sample come two measurements of it (sample_stats): how many distinct identifiers
it holds and how often its most frequent token 4-gram occurs, which is what tells a sample that names
things apart from one that loops."""

from __future__ import annotations

import argparse
import json
import keyword
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass

DEFAULT_PROMPT = "def main("


@dataclass(frozen=True)
class Decoding:
    """Keyword arguments of transformers' generate (GenerationConfig fields of the same names)."""

    max_new_tokens: int = 80
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.3
    no_repeat_ngram_size: int = 4

    def generate_kwargs(self) -> dict:
        kw = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.do_sample:
            kw.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:  # greedy: the model's generation_config must not switch sampling filters on
            kw.update(temperature=None, top_k=None, top_p=None)
        return kw

    def describe(self, seed: int | None = None) -> str:
        parts = ["sampling" if self.do_sample else "greedy"]
        if self.do_sample:
            parts += [f"temperature={self.temperature}", f"top_k={self.top_k}", f"top_p={self.top_p}", f"seed={seed}"]
        parts += [
            f"repetition_penalty={self.repetition_penalty}",
            f"no_repeat_ngram_size={self.no_repeat_ngram_size}",
            f"max_new_tokens={self.max_new_tokens}",
        ]
        return ", ".join(parts)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def sample_stats(text: str, token_ids: list[int], n: int = 4) -> dict:
    """identifiers: distinct identifier-shaped words in text (in code, strings and comments alike) that
    are not Python keywords; max_ngram: occurrences of the
    most frequent token n-gram of token_ids (1 when none repeats, 0 when there are fewer than n)."""
    names = {w for w in _IDENT.findall(text) if not keyword.iskeyword(w)}
    grams = Counter(tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1))
    return {"identifiers": len(names), f"max_{n}gram": max(grams.values(), default=0)}


def generate(model_dir: str, prompt: str = DEFAULT_PROMPT, decoding: Decoding = Decoding(), seed: int = 0) -> dict:
    """prompt + the generated continuation of the export in model_dir, its new token ids and sample_stats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)  # only sampling draws from it
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **decoding.generate_kwargs(),
        )
    new = out[0, ids.shape[1] :].tolist()
    text = prompt + tok.decode(new, skip_special_tokens=True)
    return {"text": text, "new_token_ids": new, "stats": sample_stats(text[len(prompt) :], new), "prompt": prompt}


def _parser() -> argparse.ArgumentParser:
    d = Decoding()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a transformers directory (python -m minimax_train.export ... --out DIR)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument(
        "--sample", action="store_true", help="sample (with --temperature/--top-k/--top-p) instead of greedy"
    )
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="1.0: off")
    p.add_argument("--no-repeat-ngram-size", type=int, default=d.no_repeat_ngram_size, help="0: off")
    p.add_argument("--seed", type=int, default=0, help="torch seed (used by --sample)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the framed sample")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    dec = Decoding(
        max_new_tokens=a.max_new_tokens,
        do_sample=a.sample,
        temperature=a.temperature if a.sample else 1.0,
        top_k=a.top_k if a.sample else 0,
        top_p=a.top_p if a.sample else 1.0,
        repetition_penalty=a.repetition_penalty,
        no_repeat_ngram_size=a.no_repeat_ngram_size,
    )
    res = generate(a.model_dir, a.prompt, dec, seed=a.seed)
    if a.json:
        print(json.dumps({**res, "decoding": asdict(dec), "seed": a.seed}))
        return 0
    s = res["stats"]
    print(f"decoding: transformers generate, {dec.describe(a.seed)}, prompt {a.prompt!r}")
    print("-" * 60 + "\n" + res["text"] + "\n" + "-" * 60)
    print(
        f"sample: {len(res['new_token_ids'])} new tokens, {s['identifiers']} distinct identifiers, "
        f"most frequent token 4-gram {s['max_4gram']}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
