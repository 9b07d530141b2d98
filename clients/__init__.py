"""Clients for steerserve. Depend on neither ``steering`` nor ``server``: only ``httpx`` and the standard library.

:class:`SteerClient` (sync) and :class:`AsyncSteerClient` (async) have the same methods, built on one shared
transport (:mod:`clients.transport`); results are plain JSON dicts typed by :mod:`clients.types`."""

from clients.steerserve_client import AsyncSteerClient, SteerClient, steering
from clients.transport import NO_RETRY, RetryPolicy, SteerServeError

__all__ = ["NO_RETRY", "AsyncSteerClient", "RetryPolicy", "SteerClient", "SteerServeError", "steering"]
