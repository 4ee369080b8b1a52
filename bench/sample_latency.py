"""Guided text-to-image sampling latency, ours against diffusers' StableDiffusionPipeline, side by
side in one run.

The benchmark builds a randomly initialized pipeline from the config (diffusers UNet and
AutoencoderKL, a transformers CLIPTextModel, a word tokenizer, SD's DDIM scheduler), saves it as
a diffusers directory, and loads that directory twice: with our loader (artifacts/loader.py) and
with `StableDiffusionPipeline.from_pretrained`. Both then sample the same prompts with DDIM, the
same steps and guidance scale, to images: text encoding, the denoising loop (the UNet twice per
step) and VAE decoding. Ours is `sampling.generate` (one jitted computation, compiled before
timing); theirs runs eagerly and, where it compiles, with `torch.compile` on the UNet. Each
batch size is timed over --repeats calls after an untimed one.

  python bench/sample_latency.py --config cpu_small --steps 10 --batches 1,8        # this CPU
  python bench/sample_latency.py --config sd15 --steps 50 --batches 1,8 --dtype float16
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# No huge-page restart here, as sample.py has none (cli/huge_pages.py says why).

import argparse
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402  (also puts the repo on sys.path)

from latent_diffusion_jax.artifacts.loader import load_bundle  # noqa: E402
from latent_diffusion_jax.core import parallel  # noqa: E402
from latent_diffusion_jax.data import shapes  # noqa: E402
from latent_diffusion_jax.data.tokenizers import build_word_tokenizer  # noqa: E402
from latent_diffusion_jax.interop.diffusers_config import (unet_to_diffusers_config,  # noqa: E402
                                                           vae_to_diffusers_config)
from latent_diffusion_jax.models import build  # noqa: E402
from latent_diffusion_jax.sampling.generation import generate  # noqa: E402

PROMPT_WORDS = ("a small red circle in the top left", "a large blue square in the bottom right",
                "a yellow triangle in the top right", "a green circle in the bottom left")


def write_pipeline(config, out_dir: str) -> str:
  """A random StableDiffusionPipeline of `config` saved under out_dir (diffusers layout)."""
  import torch
  import transformers
  from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
  m = config.model
  tok_dir = build_word_tokenizer(shapes.vocabulary(), os.path.join(out_dir, "word_tokenizer"),
                                 model_max_length=m.text_encoder.max_length)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(config.seed)
  strip = lambda cfg: {k: v for k, v in cfg.items() if k[0] != "_"}
  latent = build.latent_size(m)
  unet = UNet2DConditionModel.from_config(strip(unet_to_diffusers_config(build.build_unet(m), latent)))
  vae = AutoencoderKL.from_config(strip(vae_to_diffusers_config(build.build_vae(m), m.image_size,
                                                                m.latent_scale_factor)))
  clip = m.text_encoder.clip
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=max(clip.vocab_size, len(tokenizer)), hidden_size=clip.hidden_size,
      intermediate_size=clip.intermediate_size, num_hidden_layers=clip.num_hidden_layers,
      num_attention_heads=clip.num_attention_heads, hidden_act=clip.hidden_act,
      max_position_embeddings=m.text_encoder.max_length, layer_norm_eps=clip.layer_norm_eps,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id))
  d = config.diffusion
  scheduler = DDIMScheduler(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start,
                            beta_end=d.beta_end, beta_schedule=d.schedule, clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1,
                            prediction_type=d.prediction_type)
  pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
  path = os.path.join(out_dir, "pipeline")
  pipe.save_pretrained(path)
  return path


def prompts_of(n: int):
  return [PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(n)]


def time_ours(bundle, mesh, batch: int, steps: int, guidance: float, repeats: int) -> float:
  run = lambda: generate(bundle, prompts_of(batch), num_steps=steps, guidance_scale=guidance,
                         sampler="ddim", batch_size=batch, mesh=mesh, seed=0)
  run()  # compiles
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    images = run()
    best = min(best, time.perf_counter() - t)
  assert images.shape[0] == batch
  return best


def time_torch(pipe, batch: int, steps: int, guidance: float, repeats: int, dtype: str) -> float:
  import torch
  device = sbs.torch_device()

  def run():
    with torch.no_grad(), sbs.torch_autocast(dtype, device):
      out = pipe(prompts_of(batch), num_inference_steps=steps, guidance_scale=guidance,
                 output_type="np", generator=torch.Generator(device).manual_seed(0)).images
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  run()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    images = run()
    best = min(best, time.perf_counter() - t)
  assert np.isfinite(images).all() and images.shape[0] == batch
  return best


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sbs.add_common_flags(p)
  p.add_argument("--steps", type=int, default=10, help="DDIM steps")
  p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (> 1)")
  p.add_argument("--batches", default="1,8", help="batch sizes (images per call)")
  p.add_argument("--repeats", type=int, default=2, help="timed calls per batch size (best counts)")
  p.add_argument("--workdir", default="", help="where the random pipeline is written (default: a temp dir)")
  args = p.parse_args(argv)
  config = sbs.configure(args)
  batches = [int(b) for b in args.batches.split(",")]
  tmp = None
  if not args.workdir:
    tmp = tempfile.TemporaryDirectory()
    args.workdir = tmp.name
  path = write_pipeline(config, args.workdir)
  import torch
  from diffusers import StableDiffusionPipeline
  dtype = build.dtype_of(args.dtype)
  bundle = load_bundle(path, dtype=dtype, attention_impl=config.model.attention_impl)
  other = (load_bundle(path, dtype=dtype, attention_impl=args.compare_attention)
           if args.compare_attention else None)
  mesh = parallel.create_mesh(config.mesh.shape)
  pipe = StableDiffusionPipeline.from_pretrained(path).to(sbs.torch_device())
  pipe.set_progress_bar_config(disable=True)
  results = {"benchmark": "sample_latency", "config": args.config, "dtype": args.dtype,
             "attention": config.model.attention_impl, "mesh": args.mesh, "steps": args.steps,
             "guidance": args.guidance, "image_size": config.model.image_size,
             "repeats": args.repeats, "compare_attention": args.compare_attention,
             **sbs.environment(), "batches": {}}
  compiled_unet = None
  for b in batches:
    row = {"ours_seconds": time_ours(bundle, mesh, b, args.steps, args.guidance, args.repeats)}
    if other is not None:
      row["ours_attention_other_seconds"] = time_ours(other, mesh, b, args.steps, args.guidance,
                                                      args.repeats)
    row["torch_eager_seconds"] = time_torch(pipe, b, args.steps, args.guidance, args.repeats,
                                            args.dtype)
    if args.torch_compile != "off" and "torch_compile_unavailable" not in results:
      eager_unet = pipe.unet
      try:
        compiled_unet = compiled_unet or torch.compile(eager_unet)
        pipe.unet = compiled_unet
        row["torch_compile_seconds"] = time_torch(pipe, b, args.steps, args.guidance,
                                                  args.repeats, args.dtype)
      except Exception as e:  # inductor needs a working compiler toolchain for the device
        results["torch_compile_unavailable"] = (
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
      finally:
        pipe.unet = eager_unet
    for name in ("ours", "ours_attention_other", "torch_eager", "torch_compile"):
      if f"{name}_seconds" in row:
        row[f"{name}_seconds_per_image"] = row[f"{name}_seconds"] / b
        if name != "ours":
          row[f"ours_over_{name}"] = row[f"{name}_seconds"] / row["ours_seconds"]
    results["batches"][str(b)] = row
  _print(results)
  sbs.write_json(args.json, results)
  if tmp is not None:
    tmp.cleanup()
  return results


def _print(r):
  print(f"sampling, config {r['config']}, {r['image_size']} px, DDIM {r['steps']} steps, guidance "
        f"{r['guidance']}, {r['dtype']}, attention {r['attention']}, mesh {r['mesh']}, best of "
        f"{r['repeats']}")
  print(f"{r['date']}; {r['machine']}; jax {r['jax']} on {r['jax_devices']}; torch {r['torch']} "
        f"({r['torch_device']}); diffusers {r['diffusers']}; glibc huge pages "
        f"{'on' if r.get('glibc_huge_pages') else 'off'}")
  if "torch_compile_unavailable" in r:
    print(f"diffusers torch.compile unavailable: {r['torch_compile_unavailable']}")
  other = r["compare_attention"]
  print(f"| batch | ours s/image ({r['attention']}) | "
        + (f"ours s/image ({other}) | " if other else "")
        + "diffusers eager s/image | ours speed-up | diffusers torch.compile s/image | ours speed-up |")
  print("|---|---|" + ("---|" if other else "") + "---|---|---|---|")
  for b, row in r["batches"].items():
    comp = (f"{row['torch_compile_seconds_per_image']:.3f} | {row['ours_over_torch_compile']:.2f}"
            if "torch_compile_seconds" in row else "- | -")
    alt = f"{row['ours_attention_other_seconds_per_image']:.3f} | " if other else ""
    print(f"| {b} | {row['ours_seconds_per_image']:.3f} | {alt}"
          f"{row['torch_eager_seconds_per_image']:.3f} | {row['ours_over_torch_eager']:.2f} | {comp} |")


if __name__ == "__main__":
  main()
