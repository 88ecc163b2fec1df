"""The Open Inference Protocol v2 (KServe / Triton) over camserve's data plane.

:mod:`~camserve.oip.tensors` (datatypes and tensor contents, raw and JSON),
:mod:`~camserve.oip.inference` (requests and answers, independent of the transport) and
:mod:`~camserve.oip.grpc_service` (``inference.GRPCInferenceService`` on the gRPC port); the
REST routes are :mod:`camserve.http.oip`.

>>> from camserve.oip import inference
>>> inference.INPUT_NAME, inference.OUTPUTS[0]
('images', 'scores')
"""
