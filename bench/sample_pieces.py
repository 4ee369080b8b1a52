"""Where guided sampling's time goes, piece by piece, ours beside diffusers on the same weights:
the text encoder on the prompt and the empty prompt, one UNet call on the guided (doubled) batch,
and the VAE decoder, each timed alone with its parameters already on the device (median of
--repeats calls after an untimed one). bench/sample_latency.py times the whole pipelines; a
10-step image costs about text + 10 x UNet + VAE of these.

  python bench/sample_pieces.py --config cpu_small --batches 1,8
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# No huge-page restart here, as sample.py has none (cli/huge_pages.py says why).

import argparse
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402
import sample_latency  # noqa: E402

import jax  # noqa: E402

from latent_diffusion_jax.artifacts.loader import load_bundle  # noqa: E402
from latent_diffusion_jax.models import build  # noqa: E402
from latent_diffusion_jax.models.bundle import decode_latents  # noqa: E402

PIECES = ("text_encoder", "unet", "vae_decode")


def _inputs(bundle, batch: int):
  """Token ids [2B, L], UNet latents [2B, h, w, c] and timesteps, VAE latents [B, h, w, c]."""
  rng = np.random.default_rng(0)
  size = bundle.image_size // bundle.vae.downsample_factor
  c = bundle.unet.in_channels
  return {"ids": rng.integers(0, 40, (2 * batch, bundle.max_length)).astype(np.int32),
          "latents": rng.standard_normal((2 * batch, size, size, c)).astype(np.float32),
          "t": np.full((2 * batch,), 500, np.int32),
          "z": rng.standard_normal((batch, size, size, c)).astype(np.float32)}


def time_ours(bundle, x, repeats: int):
  put = jax.device_put
  text_p, unet_p, vae_p = (put(bundle.text_encoder_params), put(bundle.unet_params),
                           put(bundle.vae_params))
  ids, lat, t, z = (put(x[k]) for k in ("ids", "latents", "t", "z"))
  text = jax.jit(lambda p, i: bundle.text_encoder.apply({"params": p}, i).context)
  unet = jax.jit(lambda p, x, t, c: bundle.unet.apply({"params": p}, x, t, c))
  vae = jax.jit(lambda p, z: decode_latents(bundle.vae, p, z))
  ctx = text(text_p, ids)
  return {"text_encoder": sbs.median_ms(lambda: text(text_p, ids).block_until_ready(), repeats),
          "unet": sbs.median_ms(lambda: unet(unet_p, lat, t, ctx).block_until_ready(), repeats),
          "vae_decode": sbs.median_ms(lambda: vae(vae_p, z).block_until_ready(), repeats)}


def time_torch(pipe, x, repeats: int, dtype: str):
  import torch
  device = sbs.torch_device()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)
  ids = torch.from_numpy(x["ids"].astype(np.int64)).to(device)
  lat, z = nchw(x["latents"]), nchw(x["z"])
  t = torch.from_numpy(x["t"].astype(np.int64)).to(device)

  def run(fn):
    def call():
      with torch.no_grad(), sbs.torch_autocast(dtype, device):
        fn()
      sync()
    return sbs.median_ms(call, repeats)

  with torch.no_grad(), sbs.torch_autocast(dtype, device):
    ctx = pipe.text_encoder(ids)[0]
  return {"text_encoder": run(lambda: pipe.text_encoder(ids)),
          "unet": run(lambda: pipe.unet(lat, t, ctx)),
          "vae_decode": run(lambda: pipe.vae.decode(z))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sbs.add_common_flags(p)
  p.add_argument("--batches", default="1,8", help="images per call (the UNet sees twice as many)")
  p.add_argument("--repeats", type=int, default=10, help="timed calls per piece")
  args = p.parse_args(argv)
  config = sbs.configure(args)
  with tempfile.TemporaryDirectory() as tmp:
    path = sample_latency.write_pipeline(config, tmp)
    from diffusers import StableDiffusionPipeline
    bundle = load_bundle(path, dtype=build.dtype_of(args.dtype),
                         attention_impl=config.model.attention_impl)
    pipe = StableDiffusionPipeline.from_pretrained(path).to(sbs.torch_device())
    results = {"benchmark": "sample_pieces", "config": args.config, "dtype": args.dtype,
               "attention": config.model.attention_impl, "repeats": args.repeats,
               **sbs.environment(), "batches": {}}
    for b in (int(v) for v in args.batches.split(",")):
      x = _inputs(bundle, b)
      ours, theirs = time_ours(bundle, x, args.repeats), time_torch(pipe, x, args.repeats, args.dtype)
      results["batches"][str(b)] = {
          piece: {"ours_ms": ours[piece], "torch_eager_ms": theirs[piece],
                  "ours_over_torch_eager": theirs[piece] / ours[piece]} for piece in PIECES}
  _print(results)
  sbs.write_json(args.json, results)
  return results


def _print(r):
  print(f"sampling pieces, config {r['config']}, {r['dtype']}, attention {r['attention']}, "
        f"median of {r['repeats']}")
  print(f"{r['date']}; {r['machine']}; jax {r['jax']}; torch {r['torch']} ({r['torch_device']}); "
        f"diffusers {r['diffusers']}; glibc huge pages {'on' if r.get('glibc_huge_pages') else 'off'}")
  print("| images | piece | ours ms | diffusers eager ms | ours speed-up |")
  print("|---|---|---|---|---|")
  for b, row in r["batches"].items():
    for piece, v in row.items():
      print(f"| {b} | {piece} | {v['ours_ms']:.1f} | {v['torch_eager_ms']:.1f} | "
            f"{v['ours_over_torch_eager']:.2f} |")


if __name__ == "__main__":
  main()
