"""The benchmark page's "Reproduce" commands, built from the recorded run's arguments."""

from __future__ import annotations

from bench.suite_support import reproduce_command

DEFAULT = ".venv/bin/slotforge bench peers --out bench/results/peers.json\n" \
          ".venv/bin/python -m bench.render"


def test_run_arguments_kept() -> None:
    argv = ["slotforge", "bench", "peers", "--jobs", "30", "--out", "/tmp/p.json",
            "--work-dir", "/tmp/w", "--seed=7"]

    command = reproduce_command(argv, "bench/results/peers.json", DEFAULT)

    assert command.splitlines() == [
        ".venv/bin/slotforge bench peers --jobs 30 --seed=7 --out bench/results/peers.json",
        ".venv/bin/python -m bench.render",
    ]


def test_local_arguments_dropped() -> None:
    argv = ["slotforge", "bench", "peers", "--out=/tmp/p.json",
            "--bootstrap-servers", "127.0.0.1:9092", "--trace", "my trace.csv"]

    first = reproduce_command(argv, "bench/results/peers.json", DEFAULT).splitlines()[0]

    assert "/tmp" not in first
    assert "9092" not in first
    assert first.endswith("--trace 'my trace.csv' --out bench/results/peers.json")


def test_record_without_argv_gives_default() -> None:
    assert reproduce_command(None, "bench/results/peers.json", DEFAULT) == DEFAULT
    assert reproduce_command([], "bench/results/peers.json", DEFAULT) == DEFAULT
    pytest_argv = ["pytest", "-q", "tests/test_bench_peers.py", "--out", "x"]
    assert reproduce_command(pytest_argv, "bench/results/peers.json", DEFAULT) == DEFAULT


def test_abbreviated_local_arguments_dropped() -> None:
    argv = ["slotforge", "bench", "peers", "--ou", "/tmp/a.json", "--work-d", "/tmp/w",
            "--bootstrap=127.0.0.1:1", "--jobs", "30"]

    first = reproduce_command(argv, "bench/results/peers.json", DEFAULT).splitlines()[0]

    assert first == ".venv/bin/slotforge bench peers --jobs 30 --out bench/results/peers.json"
