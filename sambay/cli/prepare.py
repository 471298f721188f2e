"""`sambay prepare` (interim adapter: the flags still live in sambay.train.data)."""

from sambay.cli._interim import OneParser
from sambay.train.data import register


def add_prepare(parser) -> None:
    register(OneParser(parser))
