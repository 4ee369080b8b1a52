"""training/update.apply_update's health metrics: the update's norm is that of optax's updates
(taken from new minus old params), 0 on a skipped step; gradient and parameter norms as defined."""

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import optax

from latent_diffusion_jax.training import state as state_lib
from latent_diffusion_jax.training.update import apply_update


def _setup():
  cfg = mc.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, schedule="constant", b1=0.9,
                           b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0,
                           end_learning_rate_factor=0.0))
  tx, lr = state_lib.make_optimizer(cfg, 100), state_lib.learning_rate_schedule(cfg, 100)
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(keys[0], (4, 3)), "b": jax.random.normal(keys[1], (3,))}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params),
                               rng=jnp.zeros((2,), jnp.uint32), nonfinite_skips=jnp.zeros((), jnp.int32))
  grads = jax.tree.map(lambda p: jax.random.normal(keys[2], p.shape) * 3.0, params)
  return cfg, tx, lr, state, grads


def test_update_norm_is_the_norm_of_optax_updates():
  cfg, tx, lr, state, grads = _setup()
  new, m = jax.jit(lambda s, g: apply_update(s, g, jnp.float32(0.5), tx, lr, 0.99))(state, grads)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  np.testing.assert_allclose(m["update_norm"], optax.global_norm(updates), rtol=1e-5)
  assert float(m["update_norm"]) > 0
  np.testing.assert_allclose(m["grad_norm"], optax.global_norm(grads), rtol=1e-6)
  np.testing.assert_allclose(m["param_norm"], optax.global_norm(new.params), rtol=1e-6)


def test_skipped_step_reads_zero_update_norm():
  cfg, tx, lr, state, grads = _setup()
  new, m = apply_update(state, grads, jnp.float32(jnp.nan), tx, lr, 0.99)
  assert not bool(m["finite"]) and float(m["update_norm"]) == 0.0
  assert int(new.nonfinite_skips) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
