"""The engines: the single-instance step engine, the disaggregated async engine, and the offline LLM API."""
