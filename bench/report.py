"""Render benchmark results (bench/results/*.json) as a table of targets: benchmark, target,
measured, met.

    python -m bench.report                      # Markdown, for the README
    python -m bench.report --format text        # aligned plain text, for a terminal
    python -m bench.report FILE.json ... --output table.md

Below the table: the machine and software of each result (CPU, cores, memory, versions, date,
commit, load average), since the numbers mean little without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the repository's bench package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import RESULTS_DIR, format_number  # noqa: E402

ORDER = ("preprocess", "train", "predict")  # the order make bench runs them in


def load_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Result files, in make bench's order (others after, by name); unreadable files skipped
    with a warning, so one broken file does not hide the others."""
    results = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            data["_file"] = str(path)
            results.append(data)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(results, key=lambda r: (rank.get(r.get("benchmark"), len(ORDER)), r["_file"]))


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per target: benchmark, target (name, goal), measured, met, what it measures;
    then the benchmark's headline numbers without a target (met: "-")."""
    out = []
    for r in results:
        bench = r["benchmark"] + (" (quick)" if r.get("quick") else "")
        for t in r["targets"]:
            goal = f"{t['op']} {format_number(t['threshold'], t['unit'])}"
            out.append(
                [
                    bench,
                    f"{t['name']} {goal}",
                    format_number(t["measured"], t["unit"]),
                    "yes" if t["met"] else "**no**",
                    t.get("description", ""),
                ]
            )
        for i in r.get("info", []):
            out.append(
                [bench, i["name"], format_number(i["value"], i["unit"]), "-", i["description"]]
            )
    return out


def machine_line(r: dict[str, Any]) -> str:
    m = r["machine"]
    cpu, mem, v = m["cpu"], m["memory"], m["versions"]
    git = m.get("git") or {}
    commit = (git.get("commit") or "?")[:10] + (" (modified)" if git.get("dirty") else "")
    return (
        f"{r['benchmark']}: {cpu['model']}, {cpu['os_cpu_count']} cores "
        f"({cpu['affinity_count']} usable), {mem['total_gib']} GiB, {m['os']['name']}; Python "
        f"{v['python']}, TensorFlow {v['tensorflow']}, Horovod {v['horovod']}, numpy "
        f"{v['numpy']}, OpenCV {v['opencv']}, h5py {v['h5py']}; {m['date']}, commit {commit}, "
        f"load average {m.get('load_average_start')} -> {m.get('load_average_end')}"
    )


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| Benchmark | Target | Measured | Met | What |",
        "| --- | --- | ---: | :---: | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    lines.append("")
    lines += [f"- {machine_line(r)}" for r in results]
    return "\n".join(lines) + "\n"


def text(results: list[dict[str, Any]]) -> str:
    table = [["benchmark", "target", "measured", "met"]]
    table += [[b, t, m, met.strip("*")] for b, t, m, met, _ in rows(results)]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [
        "  ".join(
            cell.rjust(w) if i == 2 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines += [machine_line(r) for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "files", nargs="*", type=Path, help=f"result files (default: {RESULTS_DIR}/*.json)"
    )
    p.add_argument("--format", choices=("markdown", "text"), default="markdown")
    p.add_argument("--output", type=Path, help="write here instead of printing")
    args = p.parse_args(argv)
    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    results = load_results(files)
    if not results:
        print(f"error: no result files (looked in {RESULTS_DIR})", file=sys.stderr)
        return 1
    rendered = markdown(results) if args.format == "markdown" else text(results)
    if args.output:
        args.output.write_text(rendered)
    else:
        sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
