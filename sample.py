"""Samples images from a trained model or a diffusers pipeline and writes PNGs.

  python sample.py --checkpoint workdirs/shapes_ldm --prompt "a red circle" --out /tmp/samples
  python sample.py --diffusers /models/sd15 --prompts_file prompts.txt --steps 30 \
      --guidance_scale 7.5 --sampler dpmpp_2m --num_images_per_prompt 4 --out /tmp/sd15
  python sample.py --model /models/sd15.safetensors --prompt "a photo of a cat" --out /tmp/cat
  python sample.py --model /models/sd15 --prompt "a house" --controlnet /models/control_canny \
      --control_image edges.png --control_scale 0.8 --out /tmp/house

The model: --model (any source, detected) or one of --checkpoint, --diffusers, --single_file,
--native, the same flags as the export command's. ControlNets: --controlnet, --control_image and
--control_scale, repeatable and paired in order (one scale serves all), and --guess_mode. Writes
one PNG per image, grid.png and settings.json into --out; the logic lives in
latent_diffusion_jax.sampling.run_sampling.
"""

from absl import app, flags

from latent_diffusion_jax import sampling
from latent_diffusion_jax.cli import errors, source_flags
from latent_diffusion_jax.core.errors import FlagError

source_flags.define()
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for more.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
_NEGATIVE_PROMPT = flags.DEFINE_string("negative_prompt", "", "Unconditional text for guidance.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_images_per_prompt", 1, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Image i starts from fold_in(PRNGKey(seed), i).")
_STEPS = flags.DEFINE_integer("steps", 50, "Denoising steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance; <= 1 disables.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", list(sampling.SAMPLERS), "The sampler.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM noise (0 = deterministic).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per device call (default 4/device).")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height in pixels (default: the model's "
                               "image size); a multiple of its total downsampling.")
_WIDTH = flags.DEFINE_integer("width", None, "Image width in pixels (default: the model's image "
                              "size); a multiple of its total downsampling.")
_OUT = flags.DEFINE_string("out", "samples", "Output directory.")
_CONTROLNET = flags.DEFINE_multi_string(
    "controlnet", [], "A ControlNet: a diffusers ControlNetModel directory or an original-layout "
    "file; repeat for several (their residuals add up).")
_CONTROL_IMAGE = flags.DEFINE_multi_string(
    "control_image", [], "The control image of each --controlnet, in order, at the sampled size.")
_CONTROL_SCALE = flags.DEFINE_multi_float(
    "control_scale", [], "The scale of each --controlnet, in order (one: for all; default 1.0).")
_GUESS_MODE = flags.DEFINE_boolean(
    "guess_mode", False, "ControlNets see the prompt half of guidance only, ramped scales.")


@errors.exits_on_user_error("sample.py")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  controlnets = sampling.controlnet.pair_flags(_CONTROLNET.value, _CONTROL_IMAGE.value,
                                               _CONTROL_SCALE.value)
  if controlnets and not any(flags.FLAGS[name].value for name in source_flags.SOURCE_FLAGS):
    raise FlagError("--controlnet needs the base model it controls: give it with one of "
                           + ", ".join(f"--{name}" for name in source_flags.SOURCE_FLAGS) + ".")
  source = source_flags.source_from_flags()
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    prompts += sampling.read_prompts_file(_PROMPTS_FILE.value)
  if not prompts:
    raise app.UsageError("No prompts: pass --prompt (repeatable) or --prompts_file.")
  sampling.run_sampling(
      prompts=prompts, out_dir=_OUT.value, source=source,
      negative_prompt=_NEGATIVE_PROMPT.value, num_images_per_prompt=_NUM_PER_PROMPT.value,
      seed=_SEED.value, num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value,
      sampler=_SAMPLER.value, eta=_ETA.value, batch_size=_BATCH_SIZE.value,
      height=_HEIGHT.value, width=_WIDTH.value, controlnets=controlnets,
      guess_mode=_GUESS_MODE.value)


if __name__ == "__main__":
  app.run(main)
