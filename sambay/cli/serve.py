"""`sambay serve` (interim adapter: the flags still live in sambay.serve.server)."""

from sambay.cli._interim import OneParser
from sambay.serve.server import register


def add_serve(parser) -> None:
    register(OneParser(parser))
