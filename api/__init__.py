"""The HTTP API of the PCD service (FastAPI). Build it with ``api.main.create_app``."""
