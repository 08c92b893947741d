"""The answers of the commands: list, show, forget, stats, gc, verify, trust."""
