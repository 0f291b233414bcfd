"""How torch's CPU threads wait, chosen so that training behaves on a machine it shares.

torch's CPU build runs its parallel regions on GNU OpenMP (libgomp). Between regions libgomp's
threads busy-wait: by default each one spins 300,000 times (``GOMP_SPINCOUNT``; 30 billion under
``OMP_WAIT_POLICY=ACTIVE``, 0 under ``PASSIVE``) before it sleeps. On an idle machine that saves a
wake-up per region. Next to other CPU-bound processes it is ruinous: a region's barrier waits for a
thread the kernel has descheduled while the others burn their time slices spinning. Measured on a
2-core machine, the 60-step DRDO job on the embedded default (``python -m drdo_lightning fit
--config configs/drdo.yaml --trainer.max_steps 60 --trainer.limit_val_batches 0``, wall time
start-up included) took 16.5 s alone, 37.0 s next to one single-thread busy process and 176.9 s
next to two; with ``OMP_WAIT_POLICY=PASSIVE`` 20.6 / 23.0 / 34.6 s: no more collapse, but 25% lost
when the machine is quiet.

A finite spin count in between is the aim: :func:`configure` sets ``GOMP_SPINCOUNT`` to
:data:`SPIN_COUNT`. Exploratory runs of the same job on the same machine while other work kept the
1-minute load at 3-8 (roughly two or more busy processes; noisy, one run each) ranked the counts the
same way every time: 1000 spins as fast as passive (27.4 s against 27.5 s at load ~3.4), 3000 16%
slower, 10000 50% slower (41.1 s); at load 6-8: 0 spins 53 s, 3000 57 s, 10000 62 s, 30000 94 s,
100000 134 s, libgomp's default 217 s. The cost of 1000 spins on a quiet machine is still to be
measured (``benchmarks/shared_machine.py``; figures in docs/performance.md, "Shared machines").

libgomp reads its environment once, when it is loaded, which is when torch is first imported. So
the package calls :func:`configure` first thing in ``drdo_lightning/__init__.py``: it applies to
``python -m drdo_lightning ...`` and to any script that imports ``drdo_lightning`` before
``torch``. Where torch is already imported (a notebook that imported torch first) it can't apply and
does nothing; set the variable before Python starts instead (``GOMP_SPINCOUNT=1000 jupyter lab``).

It never overrides the user: with ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` already set it does
nothing, and ``DRDO_THREADS=off`` turns it off (libgomp's defaults then apply). The number of
threads is not touched (``OMP_NUM_THREADS`` and ``torch.set_num_threads`` stay the user's).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# libgomp's busy-wait before a thread sleeps, in spins (its default is 300000).
SPIN_COUNT = 1000
OFF_VALUES = ("off", "0", "false", "no")
USER_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def configure(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set ``GOMP_SPINCOUNT`` unless the user chose how threads wait, opted out, or torch is already loaded.

    Returns why it did nothing, or None when it set the variable.
    """
    environ = os.environ if environ is None else environ
    if environ.get("DRDO_THREADS", "").strip().lower() in OFF_VALUES:
        return "DRDO_THREADS=off"
    chosen = [name for name in USER_VARIABLES if name in environ]
    if chosen:
        return f"{chosen[0]} set by the user"
    if "torch" in sys.modules:
        return "torch was imported before drdo_lightning; its OpenMP runtime has read its settings"
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return None
