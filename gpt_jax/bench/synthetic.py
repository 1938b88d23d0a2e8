"""A deterministic, offline, English-like corpus for data benchmarks and tests (JSONL).

Words are drawn from `num_types` made-up word types (syllable strings, so every type is
distinct) with Zipf frequencies (p(rank r) ~ 1 / r^1.1); documents have log-normal lengths
around `doc_bytes`; sentences start with a capital and end in . ? or !, with commas, numbers
(years, amounts, percentages) and paragraph breaks. The same (seed, size) gives the same bytes.
"""

from __future__ import annotations

import json

import numpy as np

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ou", "ea")]


def word_types(num_types: int) -> list[str]:
    """`num_types` distinct words; low ranks (frequent words) are short."""
    base, words = len(SYLLABLES), []
    for i in range(num_types):
        parts, n = [], i
        while True:
            parts.append(SYLLABLES[n % base])
            n //= base
            if n == 0:
                break
        words.append("".join(parts))
    return words


class Generator:
    def __init__(self, seed: int = 0, num_types: int = 1_000_000, doc_bytes: int = 3000):
        self.rng = np.random.default_rng(seed)
        self.words = np.array(word_types(num_types), dtype=object)
        weights = 1.0 / np.arange(1, num_types + 1) ** 1.1
        self.cdf = np.cumsum(weights) / weights.sum()
        self.mean_words = doc_bytes / 6.5  # about 6.5 bytes per word with spaces and marks

    def _number(self) -> str:
        kind = self.rng.integers(3)
        if kind == 0:
            return str(int(self.rng.integers(1800, 2030)))
        if kind == 1:
            return f"{self.rng.integers(1, 1000)}.{self.rng.integers(0, 100):02d}"
        return f"{self.rng.integers(1, 100)}%"

    def document(self) -> str:
        n = max(5, int(self.rng.lognormal(np.log(self.mean_words), 0.7)))
        words = self.words[np.searchsorted(self.cdf, self.rng.random(n))]
        out, start = [], 0
        while start < n:
            length = int(self.rng.integers(5, 26))
            sentence = list(words[start:start + length])
            start += length
            if self.rng.random() < 0.15:
                sentence.insert(int(self.rng.integers(len(sentence) + 1)), self._number())
            if len(sentence) > 6 and self.rng.random() < 0.4:
                sentence[int(self.rng.integers(2, len(sentence) - 2))] += ","
            sentence[0] = sentence[0].capitalize()
            out.append(" ".join(sentence) + str(self.rng.choice([".", ".", ".", "?", "!"])))
            if self.rng.random() < 0.2:
                out.append("\n\n")
            else:
                out.append(" ")
        return "".join(out).strip()


def write_jsonl(path: str, megabytes: float, seed: int = 0, num_types: int = 1_000_000) -> int:
    """Write about `megabytes` MB of documents as {"text": ...} lines; returns the document count."""
    gen, written, docs = Generator(seed, num_types), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            line = json.dumps({"text": gen.document()}, ensure_ascii=False) + "\n"
            f.write(line)
            written, docs = written + len(line), docs + 1
    return docs
