"""The shared domain: money, keys, scripts, engine, events, store. Imports no web code."""
