"""The ``steerserve`` command line (entry point :func:`cli.main.main`)."""
