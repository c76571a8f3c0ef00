"""Executors: who runs the engine over which records (the local engine, the OpenAI Batch API, Ray Data)."""
