"""Online training: each step samples k responses per prompt from the current policy, scores them
with the Oracle in memory, pairs them, and trains on the pairs with the objective's own loss.

- :mod:`.options`: :class:`OnlineOptions`, the objectives' ``online`` argument;
- :mod:`.sampling`: the :class:`Sampler` interface, its Hugging Face ``generate`` backend, the seeds;
- :mod:`.pairs`: pairs from scores, and the training batch they make (pure functions);
- :mod:`.source`: one step's sampling, scoring and pairing, and what is logged of it.

The objectives' base (:class:`objectives.PreferenceModule`) drives it; nothing here is imported by
this package's ``__init__``, which the base loads first for :class:`OnlineOptions`.
"""
