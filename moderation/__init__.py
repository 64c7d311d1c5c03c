"""Processes that are not functions: CLI, dev stack, adapter, relay."""
