"""Token streams for training: documents chunked, some rewritten for fill-in-the-middle, packed with eos.

    python training/data.py --corpus /tmp/emb/corpus --tokenizer /tmp/emb/tok/4096 --out /tmp/emb/tokens.npz

Runs on the CPU, so the training machine needs only numpy and MLX. ``tokens.npz``
holds ``train`` (uint16, FIM applied to ``--fim-rate`` of the chunks) and
``held_out`` (uint16, plain) plus the byte count of each, for bits per byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tokenizer import EOS, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, read_docs

CHUNK_CHARS = 2048  # documents are split into chunks before FIM and packing


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Split at line boundaries into pieces of about ``size`` characters."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def fim(text: str, rng: np.random.Generator) -> str:
    """StarCoder-style prefix-suffix-middle transform.

    Editors ask for a few lines at the cursor, so half the middles are one to four whole
    lines; a sixth are spans between two random line starts (long middles), and a third cut
    anywhere so partial-line infill (a cursor after indentation) is seen too.
    """
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    r = rng.random()
    if r < 1 / 3:
        a, b = sorted(rng.integers(0, len(text) + 1, size=2))
    elif r < 1 / 2:
        a, b = sorted(rng.choice(starts, size=2))
    else:
        first = int(rng.integers(0, len(starts)))
        a = starts[first]
        b = starts[first + int(rng.integers(1, 5))] if first + 4 < len(starts) else len(text)
    prefix, middle, suffix = text[:a], text[a:b], text[b:]
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}{middle}"


def token_stream(tok, texts: list[str], rng: np.random.Generator, fim_rate: float) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    docs = []
    for text in texts:
        for piece in chunks(text):
            docs.append(fim(piece, rng) if rng.random() < fim_rate else piece)
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.uint16)


def main(argv=None) -> int:
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/emb/corpus"))
    ap.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    ap.add_argument("--out", type=Path, default=Path("/tmp/emb/tokens.npz"))
    ap.add_argument("--fim-rate", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    tok = Tokenizer.from_file(str(a.tokenizer / "tokenizer.json"))
    assert tok.get_vocab_size() <= 1 << 16
    train = [d["text"] for d in read_docs(a.corpus / "train.jsonl")]
    held = [d["text"] for d in read_docs(a.corpus / "held_out.jsonl")]
    rng = np.random.default_rng(a.seed)
    streams = {
        "train": token_stream(tok, train, rng, a.fim_rate),
        "held_out": token_stream(tok, held, rng, 0.0),
        "held_out_bytes": np.array(sum(len(t.encode()) for t in held) + len(held)),  # + the eos between files
        "fim_rate": np.array(a.fim_rate),
        "seed": np.array(a.seed),
    }
    np.savez(a.out, **streams)
    print(f"{len(streams['train']):,} train tokens, {len(streams['held_out']):,} held-out tokens -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
