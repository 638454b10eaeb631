"""HTTP gateway: the OpenAI-compatible Files and Batches API (FastAPI)."""
