"""The trunk daemon: serves the middle layers of a model over gRPC, one KV cache per session."""
