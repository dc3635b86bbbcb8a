"""Loading what the command lines serve, and setting up what an application sets up:
a leaf that `muser.run` and `muser.trace` both use, and nothing of muser imports.

Like uvicorn's importer: a sample name or `package.module:attr` becomes a device
factory.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable
from typing import Any

import structlog

from muser.device import PciDevice

SAMPLE_PACKAGE = "muser_samples"
DEFAULT_SAMPLE = "gpio"


def sample_names() -> list[str]:
    """The sample modules that make a device (`create`); others show how to embed one."""
    package = importlib.import_module(SAMPLE_PACKAGE)
    return sorted(
        module.name
        for module in pkgutil.iter_modules(package.__path__)
        if hasattr(importlib.import_module(f"{SAMPLE_PACKAGE}.{module.name}"), "create")
    )


def load_device_factory(spec: str) -> Callable[[], PciDevice]:
    """A sample name (`null`) or an import string (`package.module:attr`)."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
    elif spec in sample_names():
        module_name, attribute = f"{SAMPLE_PACKAGE}.{spec}", "create"
    else:
        raise SystemExit(
            f"unknown device {spec!r}: not a sample ({', '.join(sample_names())}) "
            "and not package.module:attr"
        )
    factory = getattr(importlib.import_module(module_name), attribute)
    if not callable(factory):
        raise SystemExit(f"{spec} is not callable")
    return factory  # type: ignore[no-any-return]


def configure_logging(level: str, log_format: str) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 - only the CLI depends on choosing it

        return uvloop.new_event_loop
    return asyncio.new_event_loop
