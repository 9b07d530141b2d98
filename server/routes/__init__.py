"""One APIRouter per resource; each route parses, calls a service, and returns its response model."""
