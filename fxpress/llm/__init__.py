"""Causal LMs: capture with an explicit KV cache, generate(), and the models/benches around them."""
