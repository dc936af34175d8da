"""Print the model table: parameters of every model next to the thesis's numbers.

Usage: ``python -m models.summary [--markdown] [NAME ...]``. Builds each model at its default
(thesis) input shape with 3 classes and default options, and counts ``model.count_params()``:
all weights, including BatchNorm's moving mean and variance, as the thesis counted.
"""

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's CUDA chatter on CPU hosts

import models  # noqa: E402  (after the environment tweak above, before TensorFlow)

HEADERS = ("Model", "Parameters", "Thesis count", "Input shape", "Stride", "Thesis JC_w")


def count_params(name: str) -> int:
    """Parameters of ``name`` at its default input shape (all weights, BN statistics included)."""
    import tf_keras as keras

    model = models.build(name)
    try:
        return int(model.count_params())
    finally:
        del model
        keras.backend.clear_session()  # the big models hold ~200 MB each; free before the next


def table_rows(names: Sequence[str]) -> list[tuple[str, ...]]:
    """One row of formatted cells per model, in the order of ``names``."""
    rows = []
    for name in names:
        entry = models.spec(name)
        thesis = f"{entry.thesis_params:,}"
        if entry.thesis_params_note:
            thesis += f" ({entry.thesis_params_note})"
        rows.append(
            (
                name,
                f"{count_params(name):,}",
                thesis,
                "x".join(str(s) for s in entry.default_input_shape),
                str(models.required_stride(name)),
                f"{entry.thesis_jc_w:.4f}",
            )
        )
    return rows


def format_markdown(rows: Sequence[Sequence[str]]) -> str:
    """GitHub-flavoured Markdown table, numbers right-aligned."""
    align = ("---", "---:", "---:", "---", "---:", "---:")
    lines = ["| " + " | ".join(HEADERS) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_text(rows: Sequence[Sequence[str]]) -> str:
    """Plain fixed-width table."""
    widths = [max(len(r[i]) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]
    left = {0, 3}  # text columns; numbers are right-aligned

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(HEADERS), "  ".join("-" * w for w in widths), *map(line, rows)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.summary",
        description=(
            "Build each model at the thesis's input shape (128x128x3; Unet3D 32x128x128x3) with "
            "3 classes and print its parameter count (model.count_params(): all weights, "
            "including BatchNorm moving statistics, as the thesis counted) next to the count and "
            "weighted Jaccard (JC_w) the thesis reports, plus the stride every input side must "
            "be divisible by. See models/README_table.md for why some counts differ."
        ),
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to list (default: all of {', '.join(models.MODEL_NAMES)})",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    names = args.names or list(models.MODEL_NAMES)
    for name in names:
        if name not in models.MODEL_NAMES:
            parser.error(f"unknown model {name!r}; choose from {', '.join(models.MODEL_NAMES)}")
    rows = table_rows(names)
    print(format_markdown(rows) if args.markdown else format_text(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
