"""`python -m gateway.worker` runs the worker (same as `credit-gateway worker`)."""

from .service import main

if __name__ == "__main__":
    raise SystemExit(main())
