"""Tools for trying the gateway out and testing it: the mock LLM upstream."""
