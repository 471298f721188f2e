"""`sambay train` (interim adapter: the flags still live in sambay.train.trainer)."""

from sambay.cli._interim import OneParser
from sambay.train.trainer import register


def add_train(parser) -> None:
    register(OneParser(parser))
