"""Naive reference implementations of the paper's alignment pieces, written for clarity, not speed.

The fast `dtw` and `mined` methods must give identical results to these (tests), and the
benchmarks measure their speed against them.
"""

from __future__ import annotations

import numpy as np


def lev(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def naive_dtw(tgt: list[str], src: list[str]) -> np.ndarray:
    """The paper's reference DTW (series 1 = source, series 2 = target), as a Python double loop."""
    S, T = len(src), len(tgt)
    M = np.full((S + 1, T + 1), np.inf)
    M[0, 0] = 0
    for i in range(S):
        for j in range(T):
            M[i + 1, j + 1] = lev(src[i], tgt[j]) + min(M[i, j + 1], M[i + 1, j], M[i, j])
    M = M[1:, 1:]
    i, j = S - 1, T - 1
    maps: list[list[int]] = [[] for _ in range(T)]
    while i > 0 or j > 0:
        maps[j].append(i)
        diag = M[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = M[i - 1, j] if i > 0 else np.inf
        left = M[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    maps[0].append(0)
    return np.array([m[0] if len(m) == 1 else -1 for m in maps])


def brute_min_ed(queries: list[str], choices: list[str]) -> np.ndarray:
    """MinED by brute force with the documented tie-break: min (distance, |length difference|, position)."""
    return np.array([min(range(len(choices)), key=lambda c: (lev(q, choices[c]), abs(len(q) - len(choices[c])), c))
                     for q in queries], dtype=np.int64)
