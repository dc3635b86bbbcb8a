"""Loading what the command lines serve, and setting up what an application sets up:
a leaf that `muser.run` and `muser.trace` both use, and nothing of muser imports.

Like uvicorn's importer: a sample name or `package.module:attr` becomes a device
factory.
"""

from __future__ import annotations

import argparse
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


DeviceFactory = Callable[..., PciDevice]
"""Makes a device; takes as keyword arguments the options its module adds."""
OptionAdder = Callable[[argparse._ActionsContainer], None]
"""A device module's `add_arguments(parser)`: the command-line options its factory
takes, each with a default."""


def _where(spec: str) -> tuple[str, str] | None:
    """The module and attribute a device spec names, or None if it names none."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        return module_name, attribute
    if spec in sample_names():
        return f"{SAMPLE_PACKAGE}.{spec}", "create"
    return None


def load_device_factory(spec: str) -> DeviceFactory:
    """A sample name (`null`) or an import string (`package.module:attr`)."""
    where = _where(spec)
    if where is None:
        raise SystemExit(
            f"unknown device {spec!r}: not a sample ({', '.join(sample_names())}) "
            "and not package.module:attr"
        )
    module_name, attribute = where
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
            raise  # the module is there; something it imports is not
        raise SystemExit(
            f'Could not import module "{module_name}" (python -m muser.run looks in the '
            "current directory and on PYTHONPATH)"
        ) from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise SystemExit(f'Attribute "{attribute}" not found in module "{module_name}"')
    if not callable(factory):
        raise SystemExit(f"{spec} is not callable")
    return factory  # type: ignore[no-any-return]


def device_options(spec: str) -> OptionAdder | None:
    """The `add_arguments` of the module behind a device spec, if it names a device
    whose module has one; None for anything else (an option's value, say)."""
    where = _where(spec)
    if where is None or not all(part.isidentifier() for part in where[0].split(".")):
        return None
    try:
        module = importlib.import_module(where[0])
    except ImportError:
        return None
    adder = getattr(module, "add_arguments", None)
    return adder if callable(adder) else None


def configure_logging(level: str, log_format: str) -> None:
    """Logs to stderr, as JSON or for the console (in colour only on a terminal:
    escape codes in a log file or a pipe are noise)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
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
