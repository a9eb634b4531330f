#!/usr/bin/env python3
"""Tokenizes sentences for all-MiniLM-L6-v2 (BERT uncased WordPiece) into an .npz of
input_ids, attention_mask and token_type_ids, padded to the longest sentence.

usage: minilm_inputs.py VOCAB.txt OUT.npz [SENTENCE ...]
A plain re-implementation of BERT's basic + WordPiece tokenization (lower case, accents
stripped, punctuation split), enough for English test sentences.
"""
import sys
import unicodedata

import numpy as np

DEFAULT = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Quantization makes neural networks smaller and faster on CPUs.",
]


def basic_tokens(text):
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    out, word = [], ""
    for ch in text:
        if ch.isspace():
            if word:
                out.append(word)
            word = ""
        elif unicodedata.category(ch).startswith("P") or (33 <= ord(ch) <= 47) or (58 <= ord(ch) <= 64):
            if word:
                out.append(word)
            out.append(ch)
            word = ""
        else:
            word += ch
    if word:
        out.append(word)
    return out


def wordpiece(word, vocab):
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                pieces.append(piece)
                break
            end -= 1
        else:
            return ["[UNK]"]
        start = end
    return pieces


def read_vocab(path):
    return {w.rstrip("\n"): i for i, w in enumerate(open(path, encoding="utf-8"))}


def encode(sentences, vocab):
    """The model's three inputs for `sentences`, padded to the longest."""
    ids = []
    for s in sentences:
        toks = ["[CLS]"] + [p for w in basic_tokens(s) for p in wordpiece(w, vocab)] + ["[SEP]"]
        ids.append([vocab[t] for t in toks])
    width = max(len(x) for x in ids)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}


def main():
    vocab_path, out = sys.argv[1:3]
    np.savez(out, **encode(sys.argv[3:] or DEFAULT, read_vocab(vocab_path)))


if __name__ == "__main__":
    main()
