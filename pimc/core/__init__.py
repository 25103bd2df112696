"""pimc's core: facts every layer shares, importing nothing else of pimc.

* :mod:`pimc.core.names`: the names of every IR tensor and node of a mapped layer,
  and the registry of which IR ops are array MACs, ADCs and recombinations;
* :mod:`pimc.core.formulas`: the PIM math (input quantization, bit planes, ideal and
  non-ideal ADC with transfer curve and counter-hash noise, recombination), written
  once for numpy arrays and torch tensors, equal bit for bit on both.

Passes, runtime, evaluation and training import the core; the core imports none
of them (``tests/test_layering.py`` checks the direction of every import).
"""
