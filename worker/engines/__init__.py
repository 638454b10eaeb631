"""Inference engines the worker drives: vLLM (real) and echo (a test double)."""
