"""No file of the repository carries a path of the machine it was made on.

Shipped artefacts (run folders, benchmark results), code defaults, help texts and READMEs must
work on any checkout: paths are relative (to a run folder, to the checkout) or name a dataset
by its own name; cluster examples use ``$USER``-style placeholders.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Development-machine paths: /work/... and /root/... (any), /home/<a real name>/ (placeholders
# such as /home/$USER, /home/${USER}, /home/USER are documentation), and temporary folders made by
# tempfile/pytest (/tmp/tmpXXXXXXXX, /tmp/pytest-of-..., /tmp/prefix-XXXXXXXX).
MACHINE_PATH = re.compile(
    r"(?<![\w.$~])("
    r"/(?:work|root)/[\w.$-]"
    r"|/home/(?!\\?\$\{?USER\b|USER\b)[\w.-]+"
    r"|/tmp/(?:tmp[\w]{8}\b|pytest-of-|[\w.-]+-[a-z0-9_]{8}/)"
    r")[^\s\"'`,;)\]}]*"
)


def repository_files() -> list[Path]:
    """Tracked files and new files not ignored by .gitignore (what a commit would ship)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({ROOT / name for name in listed.split("\0") if name})


def text_of(path: Path) -> str | None:
    """The file's text, or None for binary files (weights, NIfTI, images)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def machine_paths(text: str, checkout: str) -> list[tuple[int, str]]:
    """(line number, offending path) for every machine path in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if checkout in line:
            found.append((number, checkout))
        found.extend((number, m.group(0)) for m in MACHINE_PATH.finditer(line))
    return found


@pytest.mark.parametrize(
    "line",
    [
        '"dir": "/work/main/weights_work/slices128"',
        "LABELS=${LABELS:-/work/shared/data/kits19-labels}",
        "cache in /root/.cache/x",
        "see /home/alice/kits",
        '"dataset": "/tmp/kits-bench-cm3zt5bv/slices-9ea33e22a889"',
        "/tmp/tmpab3_x9qz/run",
        "/tmp/pytest-of-root/pytest-3/x",
    ],
)
def test_machine_paths_are_recognised(line: str) -> None:
    assert machine_paths(line, "/nonexistent/checkout"), line


@pytest.mark.parametrize(
    "line",
    [
        "cd /home/$USER/kits-suite",
        "KITS=/home/\\$USER/kits19/data",
        "IMAGE=/home/${USER}/images/kits-suite.sif",
        "copy to /home/USER/images/",
        "python -m preprocess.synthetic --out /tmp/small",
        "--labels kits19/data",
        "runs/work/x and $SCRATCHDIR/work/y",
        '"dir": "slices128"',
    ],
)
def test_placeholders_and_relative_paths_pass(line: str) -> None:
    assert not machine_paths(line, "/nonexistent/checkout"), line


def test_checkout_path_is_recognised() -> None:
    checkout = str(ROOT)
    assert machine_paths(f"weights: {checkout}/model_weights/unet2d", checkout)


def test_no_repository_file_holds_a_machine_path() -> None:
    checkout = str(ROOT)
    offenders = []
    for path in repository_files():
        relative = path.relative_to(ROOT).as_posix()
        if relative == THIS_FILE or not path.is_file():
            continue  # a file deleted in the working tree is not shipped
        text = text_of(path)
        if text is None:
            continue
        offenders.extend(
            f"{relative}:{number}: {found}" for number, found in machine_paths(text, checkout)
        )
    assert not offenders, "machine-specific paths in repository files:\n" + "\n".join(offenders)
