"""Benchmarks: each module ``bench.<name>`` runs one suite and renders its results page section.

A suite module provides ``run(out: Path, args: argparse.Namespace) -> dict`` (writes JSON to
``out``), ``add_arguments(parser)`` for its options, and ``render_markdown(results) -> str``.
"""
