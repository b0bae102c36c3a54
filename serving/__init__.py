"""bladeflow serving: a registry-driven Open Inference Protocol (v2) server over ONNX Runtime.

Modules: ``codec`` (v2 JSON <-> numpy), ``batching`` (dynamic batching), ``model`` (loading a
registered version), ``registry`` (reading aliases and weights), ``routing`` (champion/canary
choice), ``metrics`` (Prometheus), ``app`` (the HTTP app), ``cli`` (``bladeflow serve``),
``client`` (a Python client). Nothing is imported here: ``import serving`` stays cheap.
"""
