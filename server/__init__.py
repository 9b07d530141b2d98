"""steerserve's HTTP layer: a thin FastAPI app over :mod:`steering`."""
