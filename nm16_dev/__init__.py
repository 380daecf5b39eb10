"""Development helpers for the tests, the demo and the benchmarks (starting and stopping a ``vllm serve`` process,
...). Nothing in the runtime path imports this package: not the vLLM plugin (``vllm_nm16``), not the compressor
(``offline``).
"""
