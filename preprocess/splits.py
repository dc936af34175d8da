"""Case-level train / validation / test splits.

Default ("auto"): the thesis's case-id ranges (train 0-119 and 140-199, validation 120-139,
test 200-209) when the folder holds cases in each of those ranges; otherwise a seeded split of
whatever cases are present in the proportion 180:20:10. Splitting is by case, never by slice,
so no patient leaks between splits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

THESIS_RANGES = {
    "train": [*range(0, 120), *range(140, 200)],
    "val": list(range(120, 140)),
    "test": list(range(200, 210)),
}
DEFAULT_RATIO = (180, 20, 10)
SPLIT_MODES = ("auto", "thesis", "proportional")


def thesis_split(cases: Sequence[int]) -> dict[str, list[int]]:
    present = set(cases)
    split = {name: sorted(present & set(ids)) for name, ids in THESIS_RANGES.items()}
    other = sorted(present - set().union(*map(set, THESIS_RANGES.values())))
    split["train"] = sorted(
        split["train"] + other
    )  # ids beyond 209 train, as in KiTS19's later cases
    return split


def proportional_split(
    cases: Sequence[int], ratio: Sequence[float] = DEFAULT_RATIO, seed: int = 42
) -> dict[str, list[int]]:
    """Seeded shuffle of the cases, cut in ``ratio``; val and test get >= 1 case when n >= 3."""
    cases = sorted(cases)
    n = len(cases)
    order = np.random.default_rng(seed).permutation(n)
    total = float(sum(ratio))
    n_val = int(round(n * ratio[1] / total))
    n_test = int(round(n * ratio[2] / total))
    if n >= 3:
        n_val, n_test = max(n_val, 1) if ratio[1] > 0 else 0, max(n_test, 1) if ratio[2] > 0 else 0
    n_train = n - n_val - n_test
    picked = [cases[i] for i in order]
    return {
        "train": sorted(picked[:n_train]),
        "val": sorted(picked[n_train : n_train + n_val]),
        "test": sorted(picked[n_train + n_val :]),
    }


def make_split(
    cases: Sequence[int],
    mode: str = "auto",
    ratio: Sequence[float] = DEFAULT_RATIO,
    seed: int = 42,
    explicit: dict[str, list[int]] | None = None,
) -> tuple[dict[str, list[int]], str]:
    """Return ({split: case ids}, description of how it was made)."""
    if explicit:
        present = set(cases)
        split = {name: sorted(present & set(explicit.get(name, []))) for name in THESIS_RANGES}
        unknown = set().union(*map(set, explicit.values())) - present
        if unknown:
            raise ValueError(f"split lists cases not present: {sorted(unknown)[:10]}")
        return split, "explicit case lists"
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {mode!r}; choose from {SPLIT_MODES}")
    if mode == "thesis":
        return thesis_split(cases), "thesis case-id ranges"
    if mode == "auto":
        split = thesis_split(cases)
        if all(split[name] for name in THESIS_RANGES):
            return split, "thesis case-id ranges (auto: cases present in every range)"
    return proportional_split(
        cases, ratio, seed
    ), f"seeded proportional {list(ratio)} (seed {seed})"
