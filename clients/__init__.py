"""Clients for steerserve. Depends on neither ``steering`` nor ``server``: only ``httpx``."""

from clients.steerserve_client import SteerClient, SteerServeError, steering

__all__ = ["SteerClient", "SteerServeError", "steering"]
