"""Helpers that several test modules call: the predictor's CLI in-process, and a burst of calls against a
full queue."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tools.predictor import cli as predictor_cli

Code = TypeVar("Code")


def run_predictor_cli(*argv: object) -> int:
    """``binserve predictor ...`` in this process; its exit status."""
    parser = argparse.ArgumentParser(prog="binserve")
    predictor_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


async def first_codes(call: Callable[[], Awaitable[Code]], num_calls: int) -> list[Code]:
    """Start ``num_calls`` calls at once; the codes of the first to end; then cancel the rest (cancelling a
    call aborts its request) and wait for every one to end."""
    calls = [asyncio.create_task(call()) for _ in range(num_calls)]
    done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
    codes = [task.result() for task in done]
    for task in calls:
        task.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    return codes
