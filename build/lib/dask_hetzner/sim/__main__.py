"""``python -m dask_hetzner.sim``: the simulator's command line."""

from .cli import sim

sim(prog_name="python -m dask_hetzner.sim")
