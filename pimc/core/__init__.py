"""pimc's core: facts every layer shares, importing nothing else of pimc.

* :mod:`pimc.core.names`: the names of every IR tensor and node of a mapped layer,
  and the registry of which IR ops are array MACs, ADCs and recombinations.

Passes, runtime, evaluation and training import the core; the core imports none
of them (``tests/test_layering.py`` checks the direction of every import).
"""
