"""Pure-Python scheduling policies and KV block accounting (never imports JAX)."""
