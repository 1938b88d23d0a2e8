"""Serving: the continuous-batching engine (core) and the OpenAI-compatible HTTP server (a tool,
gpt_jax/serve/http.py)."""
