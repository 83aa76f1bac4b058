"""Three sources of randomness and a perturbed initialization, each its own axis; Grokfast's filter
as an axis; and a run's results and hash independent of the company it is trained in."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgrok import engine, optim, train
from jaxgrok.sweep import SweepError

ONE = jax.devices()[:1]


def _curves(result):
    return np.stack([result.curves[m] for m in train.METRICS], -1)


def _sweep(tiny_sweep, train_=None, **axes):
    base = {"seed": 0, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5}
    # The measures off: they do not touch training, and they lengthen every compile.
    off = {"dist_from_init": False, "fourier": False, "circularity": False, "restricted_loss": False}
    return tiny_sweep(sweep={**base, **axes}, train={"steps": 200, "eval_every": 50, **(train_ or {})}, measures=off)


def test_no_perturbation_is_todays_run_bit_for_bit(tiny_sweep):
    plain = _sweep(tiny_sweep, seed=[0, 1])
    eps0 = _sweep(tiny_sweep, seed=[0, 1], init_noise=[0.0, 1e-3])
    assert eps0.run_hashes[:2] == plain.run_hashes  # ε = 0 runs keep the hash of runs without the axis
    a, b = engine.train_sweep(plain, devices=ONE), engine.train_sweep(eps0, devices=ONE)
    np.testing.assert_array_equal(_curves(b)[:2], _curves(a))


def test_a_tiny_perturbation_stays_close_and_a_unit_one_is_like_a_new_seed(tiny_sweep):
    s = _sweep(tiny_sweep, seed=[0, 1], init_noise=[0.0, 1e-7, 1.0], noise_seed=3,
               train_={"steps": 50, "eval_every": 10})
    r = engine.train_sweep(s, devices=ONE)
    c, hp = _curves(r), s.runs
    run = lambda seed, eps: int(np.nonzero((hp["seed"] == seed) & (hp["init_noise"] == eps))[0][0])  # noqa: E731
    base, tiny, unit, other = run(0, 0.0), run(0, 1e-7), run(0, 1.0), run(1, 0.0)
    loss = train.METRICS.index("train_loss")
    # The first evaluation: 10 AdamW steps from inits 1e-7 apart stay within float tolerance...
    np.testing.assert_allclose(c[tiny, 0, loss], c[base, 0, loss], rtol=1e-4)
    assert not np.array_equal(c[tiny], c[base])  # ...yet it is another run
    # ...while ε = 1 moves as far from its base as another seed does.
    far, seed_gap = np.abs(c[unit, :, loss] - c[base, :, loss]).max(), np.abs(c[other, :, loss] - c[base, :, loss]).max()
    assert far > 0.1 * seed_gap and far > 1e3 * np.abs(c[tiny, :, loss] - c[base, :, loss]).max()
    # The perturbation direction is the noise seed's, independent of the model seed: the initial
    # weights' distance from the base, relative to the base, is about √1 = 1 at ε = 1.
    program = train.make_program(s.static, ONE)
    p0 = program.init(jax.device_put(train.hparams_for(s, np.arange(s.n_runs)), program.sharding)).params
    leaves = jax.tree.leaves(p0)
    dist = np.sqrt(sum(((x[unit] - x[base]) ** 2).sum() for x in leaves))
    norm = np.sqrt(sum((x[base] ** 2).sum() for x in leaves))
    assert 0.7 < dist / norm < 1.3


def test_batch_seed_moves_only_minibatches(tiny_sweep):
    full = engine.train_sweep(_sweep(tiny_sweep, batch_seed=[0, 5]), devices=ONE)
    np.testing.assert_array_equal(_curves(full)[0], _curves(full)[1])  # full batch: no order to change
    mb = _sweep(tiny_sweep, seed=[0, 0], batch_seed=[0, 5], zip=[["seed", "batch_seed"]], train_={"batch_size": 64})
    default = _sweep(tiny_sweep, train_={"batch_size": 64})
    assert default.runs["batch_seed"].tolist() == [0]  # follows the model seed, as before it was an axis
    assert mb.run_hashes[0] == default.run_hashes[0] != mb.run_hashes[1]
    r, d = engine.train_sweep(mb, devices=ONE), engine.train_sweep(default, devices=ONE)
    np.testing.assert_array_equal(_curves(r)[0], _curves(d)[0])
    assert not np.array_equal(_curves(r)[0], _curves(r)[1])


def test_a_run_does_not_depend_on_the_largest_train_fraction_of_its_sweep(tiny_sweep):
    """Full batch: the batch is padded to the sweep's largest training set and the padded length
    changes the rounding, so it is in the run hash; a run with the same hash is the same bit for bit.
    Minibatches do not depend on it at all."""
    alone, wide, wider = (_sweep(tiny_sweep, train_fraction=f) for f in (0.3, [0.3, 0.8], [0.3, 0.5, 0.8]))
    assert alone.run_hashes[0] != wide.run_hashes[0] == wider.run_hashes[0]
    assert wide.run_hashes[1] == wider.run_hashes[2] == _sweep(tiny_sweep, train_fraction=0.8).run_hashes[0]
    a, b = engine.train_sweep(wide, devices=ONE), engine.train_sweep(wider, devices=ONE)
    np.testing.assert_array_equal(_curves(a)[0], _curves(b)[0])
    mb = {"batch_size": 32}
    alone, wide = (_sweep(tiny_sweep, train_fraction=f, train_=mb) for f in (0.3, [0.3, 0.8]))
    assert alone.run_hashes[0] == wide.run_hashes[0]
    np.testing.assert_array_equal(_curves(engine.train_sweep(alone, devices=ONE))[0],
                                  _curves(engine.train_sweep(wide, devices=ONE))[0])


def test_grokfast_filter_is_the_reference_ema():
    """μ starts at the first gradient, then μ ← αμ + (1 − α)g; the optimizer gets g + λμ
    (ironjr/grokfast gradfilter_ema)."""
    alpha, lamb = 0.9, 2.0
    tx = optim.grokfast_ema(jnp.float32(alpha), jnp.float32(lamb))
    grads = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    state, mu = tx.init({"w": jnp.zeros(3)}), None
    for g in grads:
        out, state = tx.update({"w": jnp.asarray(g)}, state)
        mu = g if mu is None else alpha * mu + (1 - alpha) * g
        np.testing.assert_allclose(out["w"], g + lamb * mu, rtol=1e-6)
    off = optim.grokfast_ema(jnp.float32(alpha), jnp.float32(0.0))
    out, _ = off.update({"w": jnp.asarray(grads[0])}, off.init({"w": jnp.zeros(3)}))
    np.testing.assert_array_equal(out["w"], grads[0])
    assert isinstance(tx, optax.GradientTransformation)


def test_grokfast_ma_filter_is_a_moving_average_of_the_last_gradients():
    """Once `window` gradients have been seen the optimizer gets g + λ·(their mean, g included), the
    gradient itself before (ironjr/grokfast gradfilter_ma, warmup=True); a direct deque computation."""
    from collections import deque

    window, lamb = 4, 5.0
    tx = optim.grokfast_ma(window, jnp.float32(lamb))
    grads = np.random.default_rng(1).normal(size=(11, 2, 3)).astype(np.float32)
    state, last = tx.init({"w": jnp.zeros((2, 3))}), deque(maxlen=window)
    for g in grads:
        out, state = tx.update({"w": jnp.asarray(g)}, state)
        last.append(g)
        want = g + lamb * (sum(last) / window) if len(last) == window else g
        np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-6)
    off = optim.grokfast_ma(window, jnp.float32(0.0))
    state = off.init({"w": jnp.zeros((2, 3))})
    for g in grads[:window + 1]:
        out, state = off.update({"w": jnp.asarray(g)}, state)
        np.testing.assert_array_equal(out["w"], g)


def test_the_ma_filter_is_a_choice_of_the_sweep(tiny_sweep):
    ema = tiny_sweep(sweep={"seed": [0], "grokfast_lambda": [5.0], "weight_decay": 1.0, "learning_rate": 1e-2,
                            "train_fraction": 0.5})
    ma = tiny_sweep(train={"grokfast_filter": "ma", "grokfast_window": 8},
                    sweep={"seed": [0], "grokfast_lambda": [5.0], "weight_decay": 1.0, "learning_rate": 1e-2,
                           "train_fraction": 0.5})
    assert ema.run_hashes != ma.run_hashes
    curves = [_curves(engine.train_sweep(s, devices=ONE))[0] for s in (ema, ma)]
    assert np.isfinite(curves[1][..., :5]).all() and not np.array_equal(curves[0], curves[1])  # losses, accuracies, norm
    with pytest.raises(SweepError, match=r"train.grokfast_filter: must be ema or ma"):
        tiny_sweep(train={"grokfast_filter": "median"})


def test_grokfast_off_is_plain_adamw():
    """λ = 0 hands AdamW the very same gradients: op by op (no fusion), the same weights bit for bit,
    step after step. (Compiled, XLA may fuse the filter's arithmetic into AdamW's and round the last
    bit differently; hence the hash of a program with a filter, below.)"""
    rng = np.random.default_rng(0)
    grads = [{"w": jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))} for _ in range(5)]
    p0 = {"w": jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))}

    def train_(params, lamb, filtered):
        opt = optax.adamw(1e-2, b1=0.9, b2=0.98, weight_decay=1.0)
        opt = optax.chain(optim.grokfast_ema(jnp.float32(0.98), lamb), opt) if filtered else opt
        state = opt.init(params)
        for g in grads:
            updates, state = opt.update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params

    with jax.disable_jit():
        plain = train_(p0, jnp.float32(0), False)
        np.testing.assert_array_equal(train_(p0, jnp.float32(0), True)["w"], plain["w"])
        assert not np.array_equal(train_(p0, jnp.float32(2), True)["w"], plain["w"])


def test_grokfast_as_an_axis(tiny_sweep):
    """In a sweep, λ = 0 runs follow plain AdamW (to float tolerance: XLA fuses a program with the
    filter in it differently, so such runs carry their own hash) and λ > 0 runs do not."""
    plain = _sweep(tiny_sweep, seed=[0, 1], train_={"steps": 20, "eval_every": 10})
    mixed = _sweep(tiny_sweep, seed=[0, 1], grokfast_lambda=[0.0, 2.0], train_={"steps": 20, "eval_every": 10})
    assert mixed.static.grokfast and not plain.static.grokfast
    assert not set(mixed.run_hashes) & set(plain.run_hashes) and len(set(mixed.run_hashes)) == 4
    a, b = _curves(engine.train_sweep(plain, devices=ONE)), _curves(engine.train_sweep(mixed, devices=ONE))
    np.testing.assert_allclose(b[:2], a, rtol=1e-5, atol=1e-6)
    loss = train.METRICS.index("train_loss")
    assert np.abs(b[2:, :, loss] - a[:, :, loss]).max() > 1e-3


def test_llc_batch_between_the_smallest_and_largest_training_sets(tiny_sweep):
    """llc_batch_size between the sweep's smallest and largest training sets: each run draws
    min(llc_batch_size, n_train) pairs (found in review: this case did not trace under shard_map)."""
    llc = {"llc": True, "llc_every": 1, "llc_draws": 5, "llc_batch_size": 128}
    s = tiny_sweep(sweep={"seed": 0, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": [0.1, 0.6]},
                   train={"steps": 100, "eval_every": 50}, measures=llc)
    assert s.static.n_train_min < 128 < s.static.n_train_max
    mapped, vmapped = engine.train_sweep(s), engine.train_sweep(s, vectorize=True)
    assert np.isfinite(mapped.curves["llc"]).all()
    np.testing.assert_allclose(vmapped.curves["llc"], mapped.curves["llc"], rtol=1e-3)


def test_orthograd_as_an_axis(tiny_sweep):
    """⊥Grad on some runs of a sweep: its own hash (a program with it in rounds differently, as with
    Grokfast), the runs without it follow plain AdamW, those with it do not; at its default no
    run hash changes (tests/test_golden.py)."""
    plain = _sweep(tiny_sweep, seed=[0, 1], train_={"steps": 20, "eval_every": 10})
    mixed = _sweep(tiny_sweep, seed=[0, 1], orthograd=[0, 1], train_={"steps": 20, "eval_every": 10})
    assert mixed.static.orthograd and not plain.static.orthograd
    assert not set(mixed.run_hashes) & set(plain.run_hashes) and len(set(mixed.run_hashes)) == 4
    a, b = _curves(engine.train_sweep(plain, devices=ONE)), _curves(engine.train_sweep(mixed, devices=ONE))
    runs = mixed.runs["orthograd"]
    np.testing.assert_allclose(b[runs == 0], a, rtol=1e-5, atol=1e-6)
    loss = train.METRICS.index("train_loss")
    assert np.abs(b[runs == 1][:, :, loss] - a[:, :, loss]).max() > 1e-3


def test_constrained_norm_as_an_axis(tiny_sweep):
    """Omnigrok's constrained runs: with constrain_norm = 1 the weight norm is the same at every
    evaluation, while it moves without; the runs without it follow plain AdamW; its own hash."""
    cfg = dict(seed=[0, 1], init_scale=3.0, train_={"steps": 40, "eval_every": 10})
    plain = _sweep(tiny_sweep, **cfg)
    mixed = _sweep(tiny_sweep, constrain_norm=[0, 1], **cfg)
    assert mixed.static.constrain_norm and not plain.static.constrain_norm
    assert not set(mixed.run_hashes) & set(plain.run_hashes) and len(set(mixed.run_hashes)) == 4
    a, b = _curves(engine.train_sweep(plain, devices=ONE)), _curves(engine.train_sweep(mixed, devices=ONE))
    on = mixed.runs["constrain_norm"] == 1
    np.testing.assert_allclose(b[~on], a, rtol=1e-5, atol=1e-6)
    norm = b[:, :, train.METRICS.index("weight_norm")]
    np.testing.assert_allclose(norm[on], norm[on][:, :1].repeat(norm.shape[1], 1), rtol=1e-5)
    assert np.abs(norm[~on] - norm[~on][:, :1]).max() > 1e-2 * norm[~on][:, 0].min()


def test_batch_size_as_an_axis(tiny_sweep):
    """A swept minibatch size inside one program: a run at the sweep's largest size is the run of that
    fixed [train] batch_size (same hash, same curves); a smaller one is drawn at the largest and
    weighed at its own, the same run whatever the other sizes beside it (same hash, same curves), and
    close to, not bit for bit, the run alone (its hash says so); the sizes train differently."""
    cfg = dict(seed=[0, 1], train_={"steps": 40, "eval_every": 10})
    swept = _sweep(tiny_sweep, batch_size=[32, 128], **cfg)
    wider = _sweep(tiny_sweep, batch_size=[32, 64, 128], **cfg)
    alone = {b: _sweep(tiny_sweep, train_={**cfg["train_"], "batch_size": b}, seed=[0, 1]) for b in (32, 128)}
    assert swept.static.batch_varies and swept.static.train.batch_size == 128
    assert swept.resolved["train"]["batch_size"] == 0  # the file as given
    b = swept.runs["batch_size"]
    assert b.dtype == np.int64 and b.tolist() == [32, 32, 128, 128]
    assert swept.run_hashes[2:] == alone[128].run_hashes
    assert swept.run_hashes[:2] == wider.run_hashes[:2] and not set(swept.run_hashes[:2]) & set(alone[32].run_hashes)
    assert _sweep(tiny_sweep, batch_size=64, **cfg).run_hashes == _sweep(
        tiny_sweep, train_={**cfg["train_"], "batch_size": 64}, seed=[0, 1]).run_hashes
    c = {k: _curves(engine.train_sweep(s, devices=ONE)) for k, s in
         {"swept": swept, "wider": wider, 32: alone[32], 128: alone[128]}.items()}
    np.testing.assert_array_equal(c["swept"][2:], c[128])
    np.testing.assert_array_equal(c["swept"][:2], c["wider"][:2])
    loss = train.METRICS.index("train_loss")
    np.testing.assert_allclose(c["swept"][:2, :, loss], c[32][:, :, loss], rtol=1e-3)
    assert np.abs(c["swept"][:2, :, loss] - c["swept"][2:, :, loss]).max() > 1e-3


@pytest.mark.parametrize("sweep_, train_, message", [
    ({"batch_size": [32, 64]}, {"batch_size": 32}, "sweep.batch_size: give the batch size in .train. or in .sweep., not both"),
    ({"batch_size": [0, 64]}, {}, "sweep.batch_size: 0 .the full batch. cannot be swept with minibatch sizes"),
    ({"batch_size": [32, 500]}, {}, "sweep.batch_size: 500 is larger than a run's training set .480 pairs."),
    ({"batch_size": [32, 64.5]}, {}, "sweep.batch_size: must be an integer"),
    ({}, {"batch_size": 481}, "train.batch_size: 481 is larger than a run's training set .480 pairs."),
])
def test_a_batch_size_that_cannot_be_run_is_one_line(tiny_sweep, sweep_, train_, message):
    with pytest.raises(SweepError, match=message):
        _sweep(tiny_sweep, train_=train_, **sweep_)
