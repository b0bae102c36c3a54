"""bladeflow serving: a registry-driven Open Inference Protocol (v2) server over ONNX Runtime.

Modules: ``app`` (routes; the one wrapper that turns errors into answers), ``endpoints`` (route
handlers), ``request_path`` (read -> route -> decode -> batch -> run -> encode, one function each),
``errors`` (statuses), ``codec`` (v2 JSON <-> numpy, the datatype table), ``batching`` (dynamic
batching), ``shadow`` (mirroring to the canary), ``routing`` (champion/canary choice),
``fleet`` (registry state, hot swap), ``model`` (loading a registered version), ``metrics``
(Prometheus), ``openapi``, ``server`` (uvicorn), ``client`` (a Python client). Nothing is
imported here: ``import bladeflow.serving`` stays cheap.
"""
