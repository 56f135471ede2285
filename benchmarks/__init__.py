"""Benchmarks: what vllm-magic costs over raw vLLM, and what one live engine saves.

``python -m benchmarks.run`` (or ``make bench``) measures, in one process on one engine with the same
prompts: batch throughput, single-stream time to first text and decode rate, reload / switch times
and engine memory, for raw vLLM and for every front-end of vllm-magic that is installed. It writes a
markdown table, a JSON file and a PNG chart (``benchmarks/results/`` by default).
"""
