"""`sambay bench`: speed and memory, each figure held against what bounds it on this machine.

    common.py      loading a model to measure, the machine's limits (bandwidth, FLOP rates), the
                   bytes a decode step reads, a synthetic decode state, tables
    decode.py      bench decode: tokens/s and the fraction of the memory-bandwidth roofline
    prefill.py     bench prefill: tokens/s and GFLOP/s against a measured matmul peak
    serve.py       bench serve: `sambay serve` under 1, then N concurrent streaming clients
    generation.py  bench generation / memory: SambaY against its Transformer baseline

The flags live in sambay/cli/bench.py; these functions take plain values, print a table for
people and one JSON object as the last line, and return that object.
"""
