"""Full-width CLIP parity and throughput: our Flax towers vs open_clip on the same random weights.

  python bench/clip_parity.py --model ViT-H-14 --layers 2 --images 2     # ~2 min on 2 CPU cores
  python bench/clip_parity.py --model ViT-H-14 --images 64 --batch_size 32  # all 32+24 layers

Builds open_clip's `--model` at its real widths, resolution and head sizes (optionally cut to
`--layers` blocks per tower, to fit a small machine), with open_clip's random initialization,
saves the state dict as safetensors, loads it through `load_clip`, and compares image embeddings
of random `--source_size` px images (open_clip's PIL preprocessing vs ours) and caption
embeddings. Prints JSON: max absolute and relative differences, the CLIP score both ways, and our
images/s and captions/s after a warm-up call. Needs open_clip (the test extra); nothing is
downloaded.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

CAPTIONS = ["a photo of a cat sitting on a red couch",
            "an astronaut riding a horse on the moon, digital art",
            "two dogs playing with a frisbee in the park", "a bowl of soup"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="ViT-H-14")
  parser.add_argument("--layers", type=int, default=0, help="blocks per tower; 0 keeps the model's")
  parser.add_argument("--images", type=int, default=2)
  parser.add_argument("--source_size", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=50)
  args = parser.parse_args()

  from torchvision_import import import_torchvision
  import_torchvision()
  import open_clip
  import torch
  from open_clip.transform import image_transform
  from PIL import Image
  from safetensors.numpy import save_file
  from latent_diffusion_jax.evaluation.feature_nets import clip_weights
  from latent_diffusion_jax.evaluation.feature_nets.clip import load_clip
  from latent_diffusion_jax.evaluation.metrics.clip_score import clip_score

  torch.manual_seed(0)
  config, _ = clip_weights.open_clip_config(args.model)
  config = json.loads(json.dumps(config))
  if args.layers:
    config["vision_cfg"]["layers"] = config["text_cfg"]["layers"] = args.layers
  model = open_clip.model.CLIP(**{k: v for k, v in config.items() if k != "preprocess_cfg"}).eval()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.images, args.source_size, args.source_size, 3), np.uint8)
  captions = (CAPTIONS * args.images)[:args.images]
  with tempfile.TemporaryDirectory() as tmp:
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
              os.path.join(tmp, "weights.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f)
    scorer = load_clip(os.path.join(tmp, "weights.safetensors"),
                       model_name=os.path.join(tmp, "config.json"))
  ours_image = scorer.image_features(images, batch_size=args.batch_size)  # also compiles
  ours_text = scorer.text_features(captions)
  start = time.perf_counter()
  scorer.image_features(images, batch_size=args.batch_size)
  image_seconds = time.perf_counter() - start
  start = time.perf_counter()
  scorer.text_features(captions)
  text_seconds = time.perf_counter() - start

  transform = image_transform(config["vision_cfg"]["image_size"], is_train=False)
  with torch.no_grad():
    ref_image = model.encode_image(torch.stack([transform(Image.fromarray(i)) for i in images])).numpy()
    ref_text = model.encode_text(open_clip.tokenize(captions)).numpy()

  def diff(a, b):
    return {"max_abs": float(np.abs(a - b).max()),
            "max_rel": float(np.abs(a - b).max() / np.abs(b).max())}

  print(json.dumps({
      "model": args.model, "layers": args.layers or "all", "images": args.images,
      "image": diff(ours_image, ref_image), "text": diff(ours_text, ref_text),
      "clip_score_ours": clip_score(ours_image, ours_text).as_dict(),
      "clip_score_open_clip": clip_score(ref_image, ref_text).as_dict(),
      "images_per_s": args.images / image_seconds, "captions_per_s": len(captions) / text_seconds,
  }, indent=1))


if __name__ == "__main__":
  main()
