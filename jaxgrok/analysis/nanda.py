"""Nanda et al. 2023's restricted and excluded losses as the paper defines them: with each run's *final*
key frequencies, applied at every checkpoint.

The in-program measure (curves.parquet `restricted_loss`, `excluded_loss`) projects at each evaluation
onto that evaluation's own strongest `restricted_freqs` frequencies. Early in training those are not
the frequencies the run ends with, so its early values, and the excluded loss's lead time, are not
Nanda's quantities. This second pass retrains the runs from the sweep in the results' metadata (on CPU
bit for bit, checked against curves.parquet) and computes both losses at every evaluation with the key
frequencies runs.parquet records for the run (`key_freqs`: the fewest holding `key_freq_share` of the
final embedding's energy): final_key_losses.parquet, columns `restricted_loss_final` and
`excluded_loss_final`, and the paper's signatures per run.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from jaxgrok import results

COLUMNS = ("restricted_loss_final", "excluded_loss_final")


def key_rows(key_freqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each run's key frequencies (1..K) as rows of the Fourier basis, padded to the most any run has:
    (int32[runs, k], bool[runs, k] which count)."""
    k = max([1] + [len(f) for f in key_freqs])
    idx, on = np.zeros((len(key_freqs), k), np.int32), np.zeros((len(key_freqs), k), bool)
    for i, f in enumerate(key_freqs):
        idx[i, : len(f)], on[i, : len(f)] = np.asarray(f, np.int32) - 1, True
    return idx, on


def losses(sweep, runs: np.ndarray, key_freqs: list[list[int]], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(float32[runs, evals, 2]: restricted and excluded loss with the final key frequencies, the
    replay's metrics [runs, evals, len(METRICS)]), by retraining the runs `batch` at a time."""
    import jax
    import jax.numpy as jnp

    from jaxgrok import engine, models, tasks, train
    from jaxgrok.measures import fourier

    static = sweep.static
    table = tasks.make_table(static.task)
    model = train.with_precision(models.build(static.model, table.n_symbols, table.n_classes), static.train.precision)
    inputs, targets = jnp.asarray(table.inputs), jnp.asarray(table.targets)
    basis = jnp.asarray(fourier.basis(table.n_symbols))
    loss = functools.partial(train.per_example_loss, static.loss, table.n_classes)

    def one(params, is_train, idx, on):
        return jnp.stack(fourier.restricted_losses(model.apply(params, inputs), targets, is_train, idx, basis, loss, on))

    values, metrics = [], []
    for start in range(0, len(runs), batch):
        idx, on = (jnp.asarray(a) for a in key_rows(key_freqs[start:start + batch]))
        measure = jax.jit(lambda state, idx=idx, on=on: jax.vmap(one)(state.params, state.is_train, idx, on))
        v, m = engine.replay(sweep, runs[start:start + batch], measure)
        values.append(v)
        metrics.append(m)
    return np.concatenate(values), np.concatenate(metrics)


def table(runs: np.ndarray, steps: np.ndarray, values: np.ndarray, ends: np.ndarray, resolved: dict,
          exact: bool) -> pa.Table:
    """final_key_losses.parquet: a row per run and evaluation up to its end (its stopped_at)."""
    run, e = np.nonzero(np.arange(values.shape[1]) < np.asarray(ends)[:, None])  # by run, then step
    meta = results.metadata("final_key_losses", resolved) | {b"jaxgrok.replayed_exactly": str(exact).encode()}
    schema = pa.schema([("run_id", pa.int32()), ("step", pa.int64())]
                       + [(c, pa.float32()) for c in COLUMNS]).with_metadata(meta)
    return pa.table({"run_id": pa.array(np.asarray(runs)[run], pa.int32()), "step": pa.array(steps[e], pa.int64()),
                     **{c: pa.array(values[run, e, j], pa.float32()) for j, c in enumerate(COLUMNS)}},
                    schema=schema)


def _half_way_down(steps, y, start: int) -> float:
    """The first step from index `start` where log y is at or below the midpoint of its value there
    and its last value (NaN where it never falls)."""
    logy = np.log(np.maximum(y[start:], 1e-30))
    if not np.isfinite(logy).all() or logy[-1] >= logy[0]:
        return np.nan
    hit = np.nonzero(logy <= (logy[0] + logy[-1]) / 2)[0]
    return float(steps[start + hit[0]]) if len(hit) else np.nan


def signatures(cols: dict, curves: dict, steps: np.ndarray, values: np.ndarray, ends: np.ndarray) -> list[dict]:
    """The paper's signatures, per grokked run, counted over runs: the restricted loss falling
    half-way (on a log scale, from t_train to the end) before the validation loss does; the excluded
    loss higher between t_train and t_val than at t_train; the weight norm falling from its peak to
    t_val; and the number of key frequencies."""
    lead, rises, falls = [], [], []
    for i, t_val in enumerate(np.asarray(cols["t_val"], float)):
        t_train, end = float(cols["t_train"][i]), int(ends[i])
        if not (np.isfinite(t_val) and np.isfinite(t_train)):
            continue
        s = steps[:end]
        a, b = int(np.searchsorted(s, t_train)), int(np.searchsorted(s, t_val))
        r, x, v, w = values[i, :end, 0], values[i, :end, 1], curves["val_loss"][i, :end], curves["weight_norm"][i, :end]
        lead.append(_half_way_down(s, v, a) - _half_way_down(s, r, a))
        rises.append(np.nanmax(x[a:b + 1]) / x[a] if b > a else np.nan)
        falls.append(w[b] / np.nanmax(w[: b + 1]))
    lead, rises, falls = (np.asarray(z, float) for z in (lead, rises, falls))
    n_keys = np.array([len(f) for f in cols["key_freqs"] if f is not None])
    ok = lambda z: z[np.isfinite(z)]  # noqa: E731
    return [
        {"signature": "restricted loss falls half-way before the validation loss (lead, steps)",
         "runs": int((ok(lead) > 0).sum()), "of": len(ok(lead)), "median": _median(ok(lead))},
        {"signature": "excluded loss rises between t_train and t_val (peak / value at t_train)",
         "runs": int((ok(rises) > 1).sum()), "of": len(ok(rises)), "median": _median(ok(rises))},
        {"signature": "weight norm falls from its peak by t_val (value at t_val / peak)",
         "runs": int((ok(falls) < 1).sum()), "of": len(ok(falls)), "median": _median(ok(falls))},
        {"signature": "key frequencies per run", "runs": len(n_keys), "of": len(cols["run_id"]),
         "median": _median(n_keys.astype(float)), "range": [int(n_keys.min()), int(n_keys.max())] if len(n_keys) else None},
    ]


def _median(z: np.ndarray) -> float | None:
    return float(np.median(z)) if len(z) else None
