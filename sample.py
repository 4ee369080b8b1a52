"""Samples images from a trained model or a diffusers pipeline and writes PNGs.

  python sample.py --checkpoint workdirs/shapes_ldm --prompt "a red circle" --out /tmp/samples
  python sample.py --diffusers /models/sd15 --prompts_file prompts.txt --steps 30 \
      --guidance_scale 7.5 --sampler dpmpp_2m --num_images_per_prompt 4 --out /tmp/sd15
  python sample.py --model /models/sd15.safetensors --prompt "a photo of a cat" --out /tmp/cat
  python sample.py --checkpoint workdirs/class_ldm --class_label "red circle" --class_label 3
  python sample.py --checkpoint workdirs/layout_ldm --layout layouts.json
  python sample.py --diffusers /models/sd15 --prompt "a watercolor cat" --init_image cat.png \
      --strength 0.6 --out /tmp/img2img
  python sample.py --diffusers /models/sd15-inpainting --prompt "a dog" --init_image cat.png \
      --mask_image mask.png --out /tmp/inpaint
  python sample.py --diffusers /models/x4-upscaler --prompt "a cat" --low_res_image small.png \
      --noise_level 20 --out /tmp/upscaled
  python sample.py --model /models/sd15 --prompt "a house" --controlnet /models/control_canny \
      --control_image edges.png --control_scale 0.8 --out /tmp/house

Models with a non-text conditioner take --class_label, --layout (JSON, see
latent_diffusion_jax/sampling/conditions.py) or --embeddings instead of prompts.

The model: --model (any source, detected) or one of --checkpoint, --diffusers, --single_file,
--native, the same flags as the export command's. ControlNets: --controlnet, --control_image and
--control_scale, repeatable and paired in order (one scale serves all), and --guess_mode. Writes
one PNG per image, grid.png and settings.json into --out; the logic lives in
latent_diffusion_jax.sampling.run_sampling.
"""

from absl import app, flags

from latent_diffusion_jax import sampling
from latent_diffusion_jax.cli import errors, source_flags
from latent_diffusion_jax.sampling import conditions
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
_CLASS_LABEL = flags.DEFINE_multi_string(
    "class_label", [], "A class (index or name) for a class-conditional model; repeatable.")
_LAYOUT = flags.DEFINE_multi_string(
    "layout", [], "A layout for a layout-to-image model: inline JSON or a JSON file holding one "
    "layout or a list; repeatable.")
_EMBEDDINGS = flags.DEFINE_string(
    "embeddings", None, "A .npy file of [n, L, D] (or [L, D]) embeddings for a model on "
    "precomputed embeddings.")
# Image conditioning (sampling.image_conditioned): one image for every prompt.
_INIT_IMAGE = flags.DEFINE_string("init_image", None, "RGB image to start from (image-to-image, "
                                  "SDEdit) or, with --mask_image, to inpaint.")
_STRENGTH = flags.DEFINE_float("strength", None, "Image-to-image / inpainting strength in (0, 1]: "
                               "the fraction of the steps taken (default 0.8 image-to-image, 1 "
                               "inpainting).")
_MASK_IMAGE = flags.DEFINE_string("mask_image", None, "Grayscale inpainting mask, white = repaint "
                                  "(inpainting models, or any text-to-image model by re-noising).")
_KEEP_UNMASKED = flags.DEFINE_boolean(
    "keep_unmasked", False, "Inpainting: pixels outside --mask_image stay those of --init_image "
    "exactly (the result is composited over it with the mask as alpha).")
_LOW_RES_IMAGE = flags.DEFINE_string("low_res_image", None, "RGB image to upscale (upscaler models).")
_NOISE_LEVEL = flags.DEFINE_integer("noise_level", 20, "Noise level of --low_res_image.")
_SEMANTIC_MAP = flags.DEFINE_string("semantic_map", None, "Single-channel image of class ids "
                                    "(semantic-map models).")


def _image_inputs():
  if _KEEP_UNMASKED.value and not _MASK_IMAGE.value:
    raise FlagError("--keep_unmasked needs --init_image and --mask_image (inpainting).")
  if _STRENGTH.value is not None and not _INIT_IMAGE.value:
    raise FlagError("--strength needs --init_image (image-to-image or inpainting).")
  strength = _STRENGTH.value
  if strength is None:
    strength = 0.8 if _INIT_IMAGE.value and not _MASK_IMAGE.value else 1.0
  return sampling.ImageInputs(init_image=_INIT_IMAGE.value, mask_image=_MASK_IMAGE.value,
                              strength=strength, low_res_image=_LOW_RES_IMAGE.value,
                              noise_level=_NOISE_LEVEL.value, semantic_map=_SEMANTIC_MAP.value,
                              keep_unmasked=_KEEP_UNMASKED.value)
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
  if not (prompts or _CLASS_LABEL.value or _LAYOUT.value or _EMBEDDINGS.value):
    raise app.UsageError("No prompts: pass --prompt (repeatable) or --prompts_file; or, for a "
                         "model with another conditioner, --class_label, --layout or --embeddings.")
  sampling.run_sampling(
      prompts=prompts, out_dir=_OUT.value, source=source,
      class_labels=_CLASS_LABEL.value or None,
      layouts=conditions.read_layouts(_LAYOUT.value) if _LAYOUT.value else None,
      embeddings=conditions.read_embeddings(_EMBEDDINGS.value) if _EMBEDDINGS.value else None,
      embeddings_file=_EMBEDDINGS.value,
      negative_prompt=_NEGATIVE_PROMPT.value, num_images_per_prompt=_NUM_PER_PROMPT.value,
      seed=_SEED.value, num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value,
      sampler=_SAMPLER.value, eta=_ETA.value, batch_size=_BATCH_SIZE.value,
      height=_HEIGHT.value, width=_WIDTH.value, image_inputs=_image_inputs(),
      controlnets=controlnets, guess_mode=_GUESS_MODE.value)


if __name__ == "__main__":
  app.run(main)
