"""The API routers, one module per group of routes (health, admin, access, holds, pricing)."""
