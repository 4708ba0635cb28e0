"""Entry point: `python -m distserve_jax.planner profile|plan|simulate` (see `cli`)."""

from distserve_jax.planner.cli import run

if __name__ == "__main__":
    run()
