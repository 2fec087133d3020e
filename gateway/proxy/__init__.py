"""The metering reverse proxy: upstream configuration, usage extraction, forwarding."""
