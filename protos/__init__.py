"""The wire contract ``splitlm.v1`` (``splitlm/v1/trunk.proto``) and its generated modules."""

from .splitlm.v1 import trunk_pb2, trunk_pb2_grpc

__all__ = ["trunk_pb2", "trunk_pb2_grpc"]
