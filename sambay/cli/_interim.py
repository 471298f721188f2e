"""Interim: adapts a library module's old `register(subparsers)` to the parser cli/ made for it.
Removed once every command's flags live in sambay/cli/ (the layered redesign)."""


class OneParser:
    def __init__(self, parser):
        self.parser = parser

    def add_parser(self, name, **kw):
        if kw.get("description"):
            self.parser.description = kw["description"]
        return self.parser
