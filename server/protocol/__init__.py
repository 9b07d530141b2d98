"""Wire schemas, one module per resource: requests translate themselves into core types (``to_core``)."""
