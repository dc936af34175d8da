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


# The thesis's test cases (KiTS19 200-209) never train a shipped or compared model.
RESERVED_TEST = range(200, 210)
# Synthetic validation and test cases: every fourth of the first 24 real validation patients
# with a label map, from offsets 0 and 2, so both sets hold different patients.
HELD_OUT_PATTERN = {"val": slice(0, 24, 4), "test": slice(2, 24, 4)}


def recipe_split(
    label_ids: Sequence[int], real_split: dict[str, list[int]], real_ids: Sequence[int] = ()
) -> dict[str, list[int]]:
    """The split of the training recipe (scripts/train_weights.sh, scripts/compare_models.sh).

    Synthetic CT is rendered around the label maps ``label_ids``: the real validation patients
    (``real_split["val"]``) never train; a few of them are the synthetic validation and test
    cases. The real slices ``real_ids`` train and validate by ``real_split``. Returns
    ``train``, ``val``, ``test`` (synthetic) and ``real_train``, ``real_val``.
    """
    real_val = set(real_split["val"])
    held = [c for c in sorted(label_ids) if c in real_val]
    present = set(real_ids)
    return {
        "train": [c for c in sorted(label_ids) if c not in real_val and c not in RESERVED_TEST],
        "val": held[HELD_OUT_PATTERN["val"]],
        "test": held[HELD_OUT_PATTERN["test"]],
        "real_train": [c for c in real_split["train"] if c in present],
        "real_val": [c for c in real_split["val"] if c in present],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the recipe split as five space-separated comma lists ("-" for an empty one)."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from preprocess.kits import CaseError, list_cases
    from preprocess.synthetic import find_label_files

    parser = argparse.ArgumentParser(
        prog="python -m preprocess.splits",
        description="The case split of the training recipe, for the shell scripts: synthetic "
        "train, validation and test ids, then the real training and validation ids, each a "
        "comma list ('-' when empty).",
    )
    parser.add_argument(
        "--labels", default="", help="KiTS19 label maps folder (without: no synthetic ids)"
    )
    parser.add_argument(
        "--real-split", required=True, help="JSON with the real 'train' and 'val' case ids"
    )
    parser.add_argument("--real-ct", default="", help="folder of real CT cases (optional)")
    args = parser.parse_args(argv)
    try:
        label_ids = sorted(find_label_files(args.labels)) if args.labels else []
        real_ids = list_cases(args.real_ct) if args.real_ct else []
        real_split = json.loads(Path(args.real_split).read_text())
    except (CaseError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    split = recipe_split(label_ids, real_split, real_ids)
    too_few = len(split["train"]) < 10 or len(split["val"]) < 3 or len(split["test"]) < 3
    if args.labels and too_few:
        print(
            f"error: {args.labels} holds too few label maps ({len(label_ids)}) for the recipe's "
            "split (at least 10 training and 3 validation and 3 test cases)",
            file=sys.stderr,
        )
        return 2
    if args.real_ct and not split["real_val"]:
        print(
            f"error: {args.real_ct} holds none of the validation ids of {args.real_split}",
            file=sys.stderr,
        )
        return 2
    print(*(",".join(map(str, ids)) or "-" for ids in split.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
