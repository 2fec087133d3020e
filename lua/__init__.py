"""The Lua scripts, shipped as package data (gateway.lua); see gateway/core/scripts.py."""
