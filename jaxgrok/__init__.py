"""jaxgrok: hundreds of grokking runs in one compiled JAX program.

The path of a sweep through the package, one module per stage:
sweep (TOML -> runs) -> tasks, models -> train (the compiled program) -> engine (batches, chunks,
curves) -> grokking (t_train, t_val, phase) -> results (Parquet) -> analyze (statistics, figures).
"""

__version__ = "0.1.0"


def __getattr__(name):
    """`jaxgrok.run`, `jaxgrok.load`, `jaxgrok.Results` (jaxgrok/api.py), imported when first used."""
    if name in ("run", "load", "Results"):
        from jaxgrok import api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxgrok' has no attribute {name!r}")
