"""Generated gRPC code for ``protos/`` (do not edit; regenerate with ``python -m camserve.protogen``).

>>> from camserve.proto import pb, pb_grpc
>>> pb.ModelSpec(name="shapes_gap").name
'shapes_gap'
"""

from camserve.proto.camserve.v1 import camserve_pb2 as pb
from camserve.proto.camserve.v1 import camserve_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
