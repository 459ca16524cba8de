"""HTTP routers: ``admin`` (operator keys) and ``tenant`` (tenant keys)."""
