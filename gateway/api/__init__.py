"""The HTTP API: the app factory, its routes, request dependencies and error answers."""
