"""Backends: implementations of the contract in :mod:`steering.engine.base`."""
