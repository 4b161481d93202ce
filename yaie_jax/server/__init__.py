"""OpenAI-compatible HTTP server (FastAPI): app factory, protocol schemas, auth and limits, metrics."""
