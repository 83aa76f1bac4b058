"""jaxgrok: hundreds of grokking runs in one compiled JAX program.

The path of a sweep through the package, one module per stage:
sweep (TOML -> runs) -> tasks, models -> train (the compiled program) -> engine (batches, chunks,
curves) -> grokking (t_train, t_val, phase) -> results (Parquet) -> analyze (statistics, figures).
"""

__version__ = "0.1.0"
