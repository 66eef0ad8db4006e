"""Generated code lives below; see protos/generate.py."""
