"""The serving process: lifecycle, gRPC adapters over a protocol-independent data plane,
batching, the model repository, configuration, auth, status mapping and observability.

Nothing is imported here, so ``camserve.serving.repository`` or ``camserve.serving.config``
load without gRPC server machinery.
"""
