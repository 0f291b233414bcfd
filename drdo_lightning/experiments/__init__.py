"""The experiments: sweeps that train recipes and judge the results, on the library below.

Siblings on shared pieces (:mod:`.sweeps`): :mod:`.protocol` (the engine: conditions of label noise
and teachers x methods x seeds, tuned; its configurations reproduce the tuned comparison and the
robustness sweep), :mod:`.ablations` (DRDO's loss) and :mod:`.pipeline` (the paper's stages on your
data). Nothing in the library imports this package.
"""
