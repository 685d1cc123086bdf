"""binserve's gRPC API, version 1: ``generation.proto`` and its generated Python stubs.

The stubs (``generation_pb2*.py``) are generated and committed; ``python -m proto.binserve.v1.codegen``
rewrites them, and ``tests/test_proto.py`` fails when they are stale.
"""
