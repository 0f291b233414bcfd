"""The experiments: sweeps that train recipes and judge the results, on the library below.

Siblings on shared pieces (:mod:`.sweeps`): :mod:`.protocol` (the engine: conditions of label noise
and teachers x methods x seeds, tuned (:mod:`.tuning`), its cells shared where identical
(:mod:`.cells`), every method traced to equal KL (:mod:`.frontier`); its configurations reproduce the
tuned comparison, the robustness sweep and the equal-KL comparison), :mod:`.ablations` (DRDO's loss)
and :mod:`.pipeline` (the paper's stages on your data). Nothing in the library imports this package.
"""
