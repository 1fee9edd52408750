"""The HTTP side: `vllm-alloc serve` (launch), the ASGI middleware that reads, checks, applies and echoes a
request's budget, the admin route, and their shared ASGI plumbing (asgi).

Beside `profiler`, above `integration`: what the engine side needs of settings and salting lives in
`integration.config` and `vllm_alloc.values`, so no engine code imports this package.
"""
