"""`vllm-alloc profile` and `vllm-alloc show`: measure a model offline and write its budget file.

Beside `serving`, above `integration`: it drives vLLM engines with the plugin installed and measures
candidates through the served path (collective_rpc), then writes what the guard accepts.
"""
