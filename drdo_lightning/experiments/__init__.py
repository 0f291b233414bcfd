"""The experiments: sweeps that train recipes and judge the results, on the library below.

Siblings on shared pieces (:mod:`.sweeps`): :mod:`.robustness` (label noise), :mod:`.ablations`
(DRDO's loss), :mod:`.comparison` (a tuned comparison of the methods) and :mod:`.pipeline` (the paper's
stages on your data). Nothing in the library imports this package.
"""
