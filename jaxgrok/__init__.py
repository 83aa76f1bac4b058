"""jaxgrok: hundreds of grokking runs in one compiled JAX program.

The path of a sweep through the package, one module per stage:
sweep/ (TOML -> runs; the table of axes) -> registry, tasks, models -> optim, measures/ (the table of
measures) -> train (the compiled program) -> engine (batches, chunks, curves) -> grokking (t_train,
t_val, phase) -> results, store/ (Parquet, parts, checkpoints) -> analysis/ (statistics) -> report/
(figures); pipeline ties them together for cli and api.
"""

__version__ = "0.1.0"


# The public names, each imported from its module when first used (`import jaxgrok` stays light).
PUBLIC = {
    "run": "api", "load": "api", "Results": "api",  # sweeps from Python (api.py)
    # Your own task or model (registry.py), through the modules that register the built-in ones: their
    # names are taken before yours.
    "register_task": "tasks", "register_model": "models",
    "Table": "tasks", "Model": "models",  # what a registered task's table() and model's build() return
}


def __getattr__(name):
    if name in PUBLIC:
        import importlib

        return getattr(importlib.import_module(f"jaxgrok.{PUBLIC[name]}"), name)
    raise AttributeError(f"module 'jaxgrok' has no attribute {name!r}")
