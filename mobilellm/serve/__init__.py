"""The OpenAI-compatible server: HTTP layer (app.py, protocol.py) apart from the batching scheduler (scheduler.py)."""
