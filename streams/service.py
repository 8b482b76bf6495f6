"""Process entry point shared by every long-running slotforge service.

A service is a coroutine ``run(settings, stop)``: it works until ``stop`` is set, then stops
fetching, finishes or hands back in-flight work, commits offsets, flushes its producer and
returns. SIGTERM and SIGINT set ``stop``; a second signal cancels the service outright.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable

from aiokafka.errors import KafkaConnectionError

from schemas.errors import ConfigurationError
from streams.config import Settings
from streams.metrics import MetricsServer, start_metrics_server

logger = logging.getLogger(__name__)

ServiceMain = Callable[[Settings, asyncio.Event], Awaitable[None]]
# Exit status of a service that the watchdog ended because its stop did not finish in time.
STOP_TIMEOUT_EXIT_STATUS = 3


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
    # aiokafka logs every group join at INFO; that is useful, its heartbeat chatter is not.
    logging.getLogger("aiokafka.consumer.group_coordinator").setLevel(logging.WARNING)


def serve_metrics(settings: Settings) -> MetricsServer | None:
    """Start the metrics endpoint; a taken port raises ConfigurationError naming the setting."""
    try:
        return start_metrics_server(settings.metrics.port, settings.metrics.address)
    except OSError as err:
        raise ConfigurationError(
            f"cannot serve metrics on {settings.metrics.address}:{settings.metrics.port}: "
            f"{err.strerror or err}; set SLOTFORGE_METRICS__PORT to a free port, or to 0 to "
            "turn metrics off") from err


def start_failure(settings: Settings, error: ConfigurationError | KafkaConnectionError) -> str:
    """Describe an error that stops a service at start, with the setting that fixes it."""
    if isinstance(error, KafkaConnectionError):
        # A broker that is not running is the usual first-run mistake, so it gets one line.
        return (f"cannot reach Kafka at {settings.kafka.bootstrap_servers} ({error}); start a "
                "broker with `slotforge broker run`, or set SLOTFORGE_KAFKA__BOOTSTRAP_SERVERS")
    return str(error)


def start_exit_watchdog(name: str, timeout_s: float) -> threading.Timer:
    """End the process if it is still running ``timeout_s`` after a stop signal.

    While the broker is unreachable, the commits, producer flushes and group leaves of a
    stop can block far longer than a stop should take. The watchdog runs in a thread,
    because the event loop may be what is stuck.
    """

    def expire() -> None:
        logger.error("%s did not stop within %.0f s of the stop signal; exiting without "
                     "finishing cleanup (pid %d)", name, timeout_s, os.getpid())
        logging.shutdown()
        os._exit(STOP_TIMEOUT_EXIT_STATUS)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    return timer


async def _serve(name: str, main: ServiceMain, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.info("Received %s; stopping %s", signal.Signals(signum).name, name)
            stop.set()
            start_exit_watchdog(name, settings.stop_timeout_s)
        elif task is not None:
            logger.warning("Received a second signal; cancelling %s", name)
            task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    logger.info("Starting %s (pid %d)", name, os.getpid())
    metrics_server = serve_metrics(settings)
    try:
        await main(settings, stop)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        logger.info("Stopped %s (pid %d)", name, os.getpid())


def serve(name: str, main: ServiceMain, settings: Settings) -> int:
    """Run a service until it returns or a signal stops it; returns the exit status."""
    configure_logging(settings.log_level)
    try:
        asyncio.run(_serve(name, main, settings))
    except asyncio.CancelledError:
        return 1
    except (ConfigurationError, KafkaConnectionError) as err:
        logger.error("%s failed: %s", name, start_failure(settings, err))
        return 2
    except Exception:
        logger.exception("%s failed", name)
        return 1
    return 0
