"""The serving layer: gRPC API and server binary, OpenAI-compatible HTTP front, Prometheus metrics,
client, load generator and the demo."""
