"""Generated from trunk.proto by protos/generate.py; do not edit."""
