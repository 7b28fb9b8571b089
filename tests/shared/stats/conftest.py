"""Fixtures for the site-computed protocol tests: random unequal splits of pooled data into sites."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest


def split_indices(n: int, n_sites: int, rng: np.random.Generator, min_size: int = 3) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``n_sites`` parts of random, unequal sizes >= min_size."""
    if n < n_sites * min_size:
        raise ValueError("too few rows for that many sites")
    perm = rng.permutation(n)
    while True:
        cuts = np.sort(rng.choice(np.arange(min_size, n - min_size + 1), n_sites - 1, replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [n]]))
        if sizes.min() >= min_size and (n_sites == 1 or len(set(sizes.tolist())) > 1):
            return np.split(perm, cuts)


@pytest.fixture
def splitter() -> Callable[[int, int, int], list[np.ndarray]]:
    """``splitter(n, n_sites, seed)`` -> list of index arrays, one per site."""
    return lambda n, n_sites, seed: split_indices(n, n_sites, np.random.default_rng(1000 + seed))
