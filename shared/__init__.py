"""What both sides of splitlm need: model families, split plans, partial weight loading, the
tensor codec, sampling, the generation loop and the gRPC client.

Nothing here imports a front end (``splitlm.tui``) or the daemon (``splitlm.daemon``).
"""
