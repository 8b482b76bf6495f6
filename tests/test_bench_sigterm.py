"""SIGTERM during a benchmark suite: coroutines are cancelled so their clients close."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from bench.pipeline_run import exit_on_sigterm, run_until_sigterm


@pytest.fixture
def sigterm_exits() -> Iterator[None]:
    """Install the SIGTERM handler of ``slotforge bench``, and restore the old one after."""
    previous = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("sigterm_exits")
def test_run_until_sigterm_finishes_cleanup() -> None:
    stopped: list[str] = []

    async def background_routine() -> None:
        # Like aiokafka's sender task: the signal lands in this task's step, and a
        # cancellation ends it cleanly.
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stopped.append("background")

    async def work() -> None:
        background = asyncio.create_task(background_routine())
        try:
            await asyncio.sleep(10)
        finally:
            # Like a producer's stop, which awaits its sender task.
            background.cancel()
            await background
            await asyncio.sleep(0)
            stopped.append("work")

    with pytest.raises(SystemExit) as exit_info:
        run_until_sigterm(work())

    assert exit_info.value.code == 128 + signal.SIGTERM
    assert stopped == ["background", "work"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


@pytest.mark.usefixtures("sigterm_exits")
def test_run_until_sigterm_returns_result() -> None:
    handler = signal.getsignal(signal.SIGTERM)

    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert run_until_sigterm(work()) == 7
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.usefixtures("sigterm_exits")
def test_swallowed_cancellation_asked_again() -> None:
    tries: list[int] = []

    async def work() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        # Like a retry loop around a wait that turns a cancellation into a timeout.
        while True:
            tries.append(len(tries))
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if len(tries) > 1:
                    raise

    with pytest.raises(SystemExit) as exit_info:
        run_until_sigterm(work())

    assert exit_info.value.code == 128 + signal.SIGTERM
    assert tries == [0, 1]


@pytest.mark.usefixtures("sigterm_exits")
def test_other_error_after_sigterm_exits() -> None:
    async def work() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise TimeoutError("waiting for the pipeline") from None

    with pytest.raises(SystemExit) as exit_info:
        run_until_sigterm(work())

    assert exit_info.value.code == 128 + signal.SIGTERM
