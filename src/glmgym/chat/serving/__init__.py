"""Serving: the running batch, the scheduler, the OpenAI-compatible HTTP API and the web chat."""
