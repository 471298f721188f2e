"""Evaluations: long-context retrieval (phonebook, needle) and reasoning (math Pass@1).

    generation.py  the GenerateFn interface and its Engine-backed implementation
    retrieval.py   what phonebook and needle share: fitting a prompt to a token budget, scoring
    phonebook.py   the Phonebook test of "Repeat After Me" (names.txt: the names it draws from)
    needle.py      RULER-style single needle in a haystack
    math_eval.py   boxed-answer extraction, math-verify equivalence, the resumable Pass@1 loop

The command `sambay eval phonebook | needle | math` (flags, loading, tables) is sambay/cli/eval.py.

The evals see a model only through a GenerateFn (prompts + sampling params -> texts), so each can
be tested with a scripted fake and run unchanged on a real checkpoint.
"""
