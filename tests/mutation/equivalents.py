"""Surviving mutants whose behaviour is the same as the original's, each with its reason.

Keyed by (module, cosmic-ray operator, original line, mutated line), both lines stripped, so that
an entry survives edits elsewhere in the module.
"""

EQUIVALENTS: dict[tuple[str, str, str, str], str] = {}
