"""CPU-heavy request preparation off the event loop, so a large prompt or a long example list never stalls other
requests or the probes: tokenizing runs on one thread, preparing jobs (which tokenizes whole data sets) on
another."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_TOKENIZE = ThreadPoolExecutor(1, thread_name_prefix="steerserve-tokenize")
_PREPARE = ThreadPoolExecutor(1, thread_name_prefix="steerserve-prepare")


async def tokenize(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a tokenizer call on the tokenizing thread."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE, functools.partial(fn, *args, **kwargs))


async def prepare(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a job's preparation (validation and tokenizing of its data) on the preparing thread."""
    return await asyncio.get_running_loop().run_in_executor(_PREPARE, functools.partial(fn, *args, **kwargs))
