"""`python -m latent_diffusion_jax.evaluate --help`: the evaluation command (cli/evaluate.py)."""

from latent_diffusion_jax.cli.evaluate import run

if __name__ == "__main__":
  run()
