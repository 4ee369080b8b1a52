"""Three learning rates of the tiny stage-1 autoencoder (2-step runs on 64 embedded images).

  python -m latent_diffusion_jax.cli.sweep --sweep configs/sweeps/shapes_lr.py --root /tmp/shapes_lr
  python -m latent_diffusion_jax.cli.sweep --sweep configs/sweeps/shapes_lr.py \
      --launch slurm --nodes 2 --gpus_per_node 8 --workdir /shared/shapes_lr --out shapes_lr.sbatch

For a real comparison name the full config (BASE_CONFIG = "configs/shapes_autoencoder.py", 850
steps); the summary table then ranks the rates by held-out PSNR (eval/psnr).
"""

from latent_diffusion_jax.sweeps import points

BASE_CONFIG = "configs/shapes_autoencoder.py:tiny"


def sweep():
  return points.product({"optimizer.learning_rate": [5e-4, 2e-3, 8e-3]})
