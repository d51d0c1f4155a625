"""Clients of remote inference servers (TGI, OpenAI-compatible), shared by the teacher and the students:
settings, error classification, retries and the circuit breaker, and each server's start-up checks."""
