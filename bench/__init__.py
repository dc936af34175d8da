"""Benchmarks of the suite: one script per benchmark, each writing one JSON file.

Run from the repository root (``make bench`` runs them all, then prints the summary)::

    python -m bench.preprocess [--quick] [--out FILE]  # loading, preprocessing: 1 vs 2 ranks
    python -m bench.train      [--quick] [--out FILE]  # training scaling, input pipeline
    python -m bench.predict    [--quick] [--out FILE]  # inference time per volume, its split
    python -m bench.report     [--format markdown]     # targets table of bench/results/*.json

Each result file (``bench/results/<name>.json`` by default) holds the parameters, the machine,
the measurements and the targets with a computed ``met`` flag; ``bench/common.py`` holds what the
scripts share. ``--quick`` runs a small version for tests and smoke checks (numbers not
meaningful).
"""
