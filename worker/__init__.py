"""The worker (installed as gateway.worker): persists the partition streams to the store."""
