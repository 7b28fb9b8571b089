"""Fixtures for the statistics tests: reference data sets and random multi-site data."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

# pROC's aSAH data set (Turck et al. 2010; R package pROC, data/aSAH.RData): 113 patients with
# aneurysmal subarachnoid haemorrhage; outcome Good/Poor; wfns is the ordered factor's level 1-5.
# Exported from the .RData file with pyreadr. (Kept inline: the repo's .gitignore ignores data/.)
ASAH_CSV = """\
gos6,outcome,gender,age,wfns,s100b,ndka
5,Good,Female,42,1,0.13,3.01
5,Good,Female,37,1,0.14,8.54
5,Good,Female,42,1,0.1,8.09
5,Good,Female,27,1,0.04,10.42
1,Poor,Female,42,3,0.13,17.4
1,Poor,Male,48,2,0.1,12.75
4,Good,Male,57,5,0.47,6.0
1,Poor,Male,41,4,0.16,13.2
5,Good,Female,49,1,0.18,15.54
4,Good,Female,75,2,0.1,6.01
1,Poor,Male,37,5,0.12,15.96
5,Good,Female,49,2,0.1,17.86
3,Poor,Male,49,5,0.44,5.18
1,Poor,Male,71,5,0.71,8.9
5,Good,Female,64,1,0.04,13.41
5,Good,Female,49,2,0.08,20.75
1,Poor,Male,63,5,0.49,11.6
5,Good,Female,33,2,0.04,16.11
3,Poor,Female,51,2,0.07,32.37
1,Poor,Male,54,5,0.33,54.82
3,Poor,Female,78,2,0.09,32.41
5,Good,Female,47,1,0.09,49.94
3,Poor,Female,56,1,0.07,40.34
5,Good,Male,76,1,0.11,9.47
5,Good,Female,58,1,0.07,6.29
5,Good,Female,50,2,0.17,12.53
5,Good,Male,36,1,0.07,6.54
5,Good,Female,43,2,0.11,6.3
5,Good,Female,61,1,0.13,80.3
5,Good,Male,31,1,0.19,12.8
5,Good,Female,58,3,0.05,9.8
5,Good,Female,61,4,0.16,9.81
1,Poor,Female,76,2,0.41,9.85
5,Good,Female,54,1,0.14,18.21
5,Good,Female,55,4,0.34,5.03
1,Poor,Male,57,5,0.35,14.04
3,Poor,Female,64,4,0.48,21.93
5,Good,Female,67,1,0.09,8.02
3,Poor,Male,71,4,0.96,7.42
3,Poor,Female,74,2,0.25,8.38
5,Good,Female,72,5,0.5,6.59
5,Good,Female,62,5,0.46,9.63
5,Good,Female,65,1,0.16,13.12
5,Good,Male,50,1,0.07,7.96
5,Good,Female,51,2,0.43,14.34
5,Good,Male,50,4,0.45,41.43
5,Good,Male,35,1,0.11,7.63
5,Good,Male,44,1,0.08,7.06
5,Good,Male,45,2,0.09,12.59
3,Poor,Female,48,5,0.86,13.56
3,Poor,Female,61,5,0.52,3.87
5,Good,Male,36,2,0.08,9.44
5,Good,Female,53,1,0.06,7.66
4,Good,Female,66,2,0.13,12.98
1,Poor,Female,73,5,2.07,419.19
5,Good,Female,58,1,0.1,27.19
5,Good,Male,31,2,0.14,22.27
5,Good,Female,28,2,0.15,9.95
1,Poor,Male,32,2,0.07,21.22
5,Good,Female,36,1,0.06,11.73
1,Poor,Female,47,5,0.77,10.4
5,Good,Male,29,1,0.05,58.83
4,Good,Female,46,1,0.09,6.39
1,Poor,Female,73,2,0.3,11.09
1,Poor,Female,45,5,0.03,12.22
1,Poor,Male,40,2,0.09,13.67
5,Good,Male,50,1,0.04,17.21
3,Poor,Male,57,4,0.23,22.63
1,Poor,Male,37,5,0.7,12.9
5,Good,Female,60,2,0.09,9.7
1,Poor,Female,53,4,0.27,21.57
3,Poor,Female,57,4,0.71,8.23
1,Poor,Male,56,1,0.08,72.57
1,Poor,Female,31,4,0.26,15.54
5,Good,Male,59,1,0.08,10.51
5,Good,Female,66,2,0.16,10.6
5,Good,Male,50,1,0.09,14.57
1,Poor,Male,54,4,0.13,5.19
3,Poor,Male,55,2,0.1,9.63
5,Good,Female,51,1,0.08,4.61
1,Poor,Female,44,2,0.11,21.48
5,Good,Female,45,3,0.33,17.3
5,Good,Female,47,2,0.11,12.71
5,Good,Female,57,4,0.28,9.44
5,Good,Male,29,2,0.07,11.07
5,Good,Female,52,1,0.1,19.46
5,Good,Male,18,4,0.32,10.83
1,Poor,Male,68,5,0.22,5.37
5,Good,Female,47,1,0.07,11.97
5,Good,Male,45,1,0.05,7.75
5,Good,Female,34,5,0.24,9.83
5,Good,Female,60,4,0.38,10.55
5,Good,Female,33,2,0.1,28.49
5,Good,Female,38,2,0.15,8.53
5,Good,Female,48,1,0.08,12.57
5,Good,Female,67,1,0.14,12.9
5,Good,Male,64,1,0.1,46.83
5,Good,Female,70,3,0.07,11.68
4,Good,Male,24,1,0.04,12.67
5,Good,Female,74,2,0.19,9.01
1,Poor,Male,42,5,0.56,9.57
1,Poor,Female,63,2,0.14,34.06
1,Poor,Female,81,2,0.58,11.72
3,Poor,Female,62,5,0.32,14.26
1,Poor,Male,33,5,0.82,47.61
1,Poor,Female,51,5,0.74,11.67
5,Good,Female,29,2,0.15,24.58
5,Good,Female,68,4,0.47,10.33
4,Good,Male,53,4,0.17,13.87
1,Poor,Male,58,5,0.44,15.89
5,Good,Female,32,1,0.15,22.43
5,Good,Female,39,1,0.5,6.79
5,Good,Male,34,1,0.48,13.45
"""

# Spector & Mazzeo (1980) data as shipped by statsmodels (statsmodels.datasets.spector): 32 students.
SPECTOR_CSV = """\
GPA,TUCE,PSI,GRADE
2.66,20.0,0.0,0.0
2.89,22.0,0.0,0.0
3.28,24.0,0.0,0.0
2.92,12.0,0.0,0.0
4.0,21.0,0.0,1.0
2.86,17.0,0.0,0.0
2.76,17.0,0.0,0.0
2.87,21.0,0.0,0.0
3.03,25.0,0.0,0.0
3.92,29.0,0.0,1.0
2.63,20.0,0.0,0.0
3.32,23.0,0.0,0.0
3.57,23.0,0.0,0.0
3.26,25.0,0.0,1.0
3.53,26.0,0.0,0.0
2.74,19.0,0.0,0.0
2.75,25.0,0.0,0.0
2.83,19.0,0.0,0.0
3.12,23.0,1.0,0.0
3.16,25.0,1.0,1.0
2.06,22.0,1.0,0.0
3.62,28.0,1.0,1.0
2.89,14.0,1.0,0.0
3.51,26.0,1.0,0.0
3.54,24.0,1.0,1.0
2.83,27.0,1.0,1.0
3.39,17.0,1.0,1.0
2.67,24.0,1.0,0.0
3.65,21.0,1.0,1.0
4.0,23.0,1.0,1.0
3.1,21.0,1.0,0.0
2.39,19.0,1.0,1.0
"""


@pytest.fixture(scope="session")
def asah() -> pd.DataFrame:
    d = pd.read_csv(io.StringIO(ASAH_CSV))
    d["y"] = (d["outcome"] == "Poor").astype(int)
    return d


@pytest.fixture(scope="session")
def spector() -> pd.DataFrame:
    return pd.read_csv(io.StringIO(SPECTOR_CSV))


def split_indices(rng: np.random.Generator, n: int, n_sites: int) -> list[np.ndarray]:
    """Random partition of range(n) into n_sites non-empty parts of unequal size."""
    perm = rng.permutation(n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=n_sites - 1, replace=False)) if n_sites > 1 else []
    return np.split(perm, cuts)


@pytest.fixture(scope="session")
def make_split() -> Callable[[np.random.Generator, int, int], list[np.ndarray]]:
    return split_indices


@pytest.fixture(scope="session")
def make_binary() -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(y, score_a, score_b)`` of size n with informative, tied scores on the 1/step grid."""

    def make(rng: np.random.Generator, n: int, step: int = 100, off_grid: bool = False):
        y = (rng.uniform(size=n) < rng.uniform(0.2, 0.8)).astype(np.int64)
        if y.sum() in (0, n):
            y[0], y[-1] = 1, 0
        a = np.clip(rng.normal(0.45 + 0.2 * y * rng.uniform(0, 1), 0.2), 0, 1)
        b = np.clip(0.6 * a + 0.4 * rng.uniform(size=n), 0, 1)
        if not off_grid:
            a, b = np.round(a * step) / step, np.round(b * step) / step
        return y, a, b

    return make


# --- site-computed protocol tests (survival, ICC, k-means, correlation)
def split_unequal(n: int, n_sites: int, rng: np.random.Generator, min_size: int = 3) -> list[np.ndarray]:
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
    return lambda n, n_sites, seed: split_unequal(n, n_sites, np.random.default_rng(1000 + seed))
