"""Work sharing between ranks: each rank takes the next case nobody has claimed yet.

A claim is a file created with O_EXCL in a folder of the run, so exactly one rank gets each
case, also across nodes on a shared filesystem. Ranks take cases largest first and the next one
when done with the last, so they finish together however long each case takes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

STOP = "stop"  # in the claims folder: a rank failed, the others take no new case


def largest_first(cases: list[int], sizes: dict[int, int]) -> list[int]:
    """The order ranks take cases in: largest imaging file first (ties by id), so that the
    last cases, when one rank may finish before the other, are the small ones."""
    return sorted(cases, key=lambda c: (-sizes[c], c))


def claim_cases(order: list[int], claims: Path) -> Iterator[tuple[int, int]]:
    """(position, case id) of each case in ``order`` that this rank is the first to claim.

    Every rank walks the same order and claims a case by creating a file named after it in
    ``claims`` (O_EXCL: exactly one rank succeeds). Stops early once a ``stop`` file appears.
    """
    for position, case_id in enumerate(order):
        if (claims / STOP).exists():
            return
        try:
            fd = os.open(claims / str(case_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        yield position, case_id
