"""The optimizer table: every name a sweep file accepts has a recipe, and each recipe is an optax chain."""

import jax.numpy as jnp
import numpy as np
import optax

from jaxgrok import optim
from jaxgrok.sweep import OPTIMIZERS, TrainConfig


def test_every_optimizer_a_sweep_accepts_has_one_recipe():
    assert set(optim.RECIPES) == set(OPTIMIZERS)


def test_no_warm_up_is_the_full_rate_from_the_first_step():
    assert optim.warmup(0.5, 0) == 0.5
    schedule = optim.warmup(0.5, 10)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == 0.5


def test_each_recipe_updates_a_pytree():
    params = {"w": jnp.ones(3)}
    for name in OPTIMIZERS:
        cfg = TrainConfig(steps=10, optimizer=name)
        hp = type("Hp", (), {"learning_rate": jnp.float32(0.1), "weight_decay": jnp.float32(1.0),
                             "grokfast_alpha": jnp.float32(0.9), "grokfast_lambda": jnp.float32(0.0)})
        for grokfast in (False, True):
            opt = optim.optimizer(cfg, hp, grokfast)
            assert isinstance(opt, optax.GradientTransformation)
            updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
            assert np.isfinite(np.asarray(updates["w"])).all()
