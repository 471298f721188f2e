"""`sambay bench` (interim adapter: the flags still live in sambay.bench.decode)."""

from sambay.cli._interim import OneParser
from sambay.bench.decode import register


def add_bench(parser) -> None:
    register(OneParser(parser))
