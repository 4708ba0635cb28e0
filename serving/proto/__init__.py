"""gRPC API of the server: `distserve.proto` and its generated stubs (see `generate.py`)."""
