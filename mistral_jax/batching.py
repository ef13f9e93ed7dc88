"""Shape bucketing: every batch is padded to a fixed batch size and to one of a few lengths, so a job of
many different prompts compiles a handful of programs, not one per prompt."""

from __future__ import annotations

import numpy as np


def bucket_length(n: int, max_len: int, minimum: int = 16) -> int:
    """Smallest bucket >= n, capped at max_len. Buckets are the powers of two from `minimum` and the midpoints
    1.5 x 2^k between them (16, 24, 32, 48, 64, 96, ...): at most a third of a row is padding (half, with powers
    of two alone, and prefill's work grows with it), for twice as many shapes, still a handful."""
    b = minimum
    while b < n:
        if b * 3 // 2 >= n and (b * 3 // 2) % 8 == 0:
            b = b * 3 // 2
            break
        b *= 2
    return min(b, max_len)


def pad_rows(rows: list[list[int]], batch_size: int, length: int, pad_id: int = 0):
    """Right-pads token rows into int32 [batch_size, length] tokens and their lengths [batch_size].

    Missing rows (a last, partial batch) are all padding with length 0."""
    tokens = np.full((batch_size, length), pad_id, np.int32)
    lengths = np.zeros((batch_size,), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        lengths[i] = len(r)
    return tokens, lengths
