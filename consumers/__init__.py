"""Downstream consumer groups of the pipeline, each run as its own process."""
