"""Routers, one module per resource; ``api.main`` includes them."""
