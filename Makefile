# `make test` and `make demo` work on a fresh machine: they create the venv and install everything.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build that lies on this machine's disk; any other version pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The parity references of the evaluation networks (pytorch-fid's Inception on torchvision's blocks,
# open_clip) go to their own folder, put on sys.path only by the tests that use them
# (tests/torchvision_import.py): the torchvision wheels are linked against CUDA torch, and in
# site-packages beside the CPU torch they would break transformers' and diffusers' model imports.
TORCHVISION_SPEC ?= torchvision==0.28.0
PARITY_REFS_SPEC := "$(TORCHVISION_SPEC)" pytorch-fid==0.3.0 open-clip-torch==3.3.0 timm ftfy wcwidth

DEMO ?= workdirs/demo
DEMO_VQ ?= workdirs/demo_vq
# The first stage the conditioning demos share (class, layout, inpaint, sr, semantic): trained on
# 1-3 shapes per image for 2400 steps, about 8 minutes once; each demo trains it if it is missing.
DEMO_AE_LAYOUTS := $(DEMO)/autoencoder_layouts

.PHONY: venv test demo demo-vq demo-controlnet demo-inpaint demo-sr demo-semantic demo-class demo-layout clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps --target $(VENV)/parity_refs $(PARITY_REFS_SPEC)
	touch $@

venv: $(VENV)/.installed

# Layer and no-tensorflow contracts (setup.cfg [importlinter]) first: they take a second.
test: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=25 tests

# The embedded default end to end: stage 1 (autoencoder), stage 2 (text-to-image LDM), a sample
# grid, and the caption-fidelity score on held-out captions (fails below 80% of images with color,
# position and shape all right).
demo: venv
	$(PY) train.py --config configs/shapes_autoencoder.py --workdir $(DEMO)/autoencoder \
	  --config.data.data_dir=$(DEMO)/tfds
	$(PY) train.py --config configs/shapes_ldm.py --workdir $(DEMO)/ldm \
	  --config.data.data_dir=$(DEMO)/tfds --config.frozen.vae=$(DEMO)/autoencoder
	$(PY) sample.py --checkpoint $(DEMO)/ldm --out $(DEMO)/samples --guidance_scale 3 --steps 50 \
	  --prompt "a red circle in the top left" --prompt "a blue square in the bottom right" \
	  --prompt "a yellow triangle in the top right" --prompt "a green circle in the bottom left" \
	  --num_images_per_prompt 4
	$(PY) -m latent_diffusion_jax.evaluation.shapes_demo --checkpoint $(DEMO)/ldm \
	  --out $(DEMO)/caption_fidelity --min_accuracy 0.8

# The same on the LDM paper's VQ-regularized f4 first stage: stage 2 diffuses the VQ model's
# pre-quantization latents and samples decode through its quantizer. Its bar is color+position
# (its shape read 47.9% when last measured, BENCHMARKS.md).
demo-vq: venv
	$(PY) train.py --config configs/shapes_vq_autoencoder.py --workdir $(DEMO_VQ)/autoencoder \
	  --config.data.data_dir=$(DEMO_VQ)/tfds
	$(PY) train.py --config configs/shapes_ldm_vq.py --workdir $(DEMO_VQ)/ldm \
	  --config.data.data_dir=$(DEMO_VQ)/tfds --config.frozen.vae=$(DEMO_VQ)/autoencoder
	$(PY) sample.py --checkpoint $(DEMO_VQ)/ldm --out $(DEMO_VQ)/samples --guidance_scale 3 --steps 50 \
	  --prompt "a red circle in the top left" --prompt "a blue square in the bottom right" \
	  --prompt "a yellow triangle in the top right" --prompt "a green circle in the bottom left" \
	  --num_images_per_prompt 4
	$(PY) -m latent_diffusion_jax.evaluation.shapes_demo --checkpoint $(DEMO_VQ)/ldm \
	  --out $(DEMO_VQ)/caption_fidelity --min_accuracy 0.8 --caption_bar color_and_position

$(DEMO_AE_LAYOUTS)/stage1.json: | venv
	$(PY) train.py --config configs/shapes_autoencoder.py:layouts --workdir $(DEMO_AE_LAYOUTS) \
	  --config.data.data_dir=$(DEMO)/tfds

# Class-conditional and layout-to-image LDMs on the shared conditioning first stage, scored
# on generated pixels (evaluation/class_fidelity.py, layout_fidelity.py).
demo-class: venv $(DEMO_AE_LAYOUTS)/stage1.json
	$(PY) train.py --config configs/shapes_class_ldm.py --workdir $(DEMO)/class_ldm \
	  --config.data.data_dir=$(DEMO)/tfds --config.frozen.vae=$(DEMO_AE_LAYOUTS)
	$(PY) -m latent_diffusion_jax.evaluation.shapes_demo --task class --checkpoint $(DEMO)/class_ldm \
	  --out $(DEMO)/class_fidelity --min_accuracy 0.9

demo-layout: venv $(DEMO_AE_LAYOUTS)/stage1.json
	$(PY) train.py --config configs/shapes_layout_ldm.py --workdir $(DEMO)/layout_ldm \
	  --config.data.data_dir=$(DEMO)/tfds --config.frozen.vae=$(DEMO_AE_LAYOUTS)
	$(PY) -m latent_diffusion_jax.evaluation.shapes_demo --task layout --checkpoint $(DEMO)/layout_ldm \
	  --out $(DEMO)/layout_fidelity --min_accuracy 0.8

# A ControlNet on top of `make demo`'s LDM (run that first): outline maps place the shape, the
# prompt never names the position; then placement on held-out layouts, with and without it.
demo-controlnet: venv
	$(PY) train.py --config configs/shapes_controlnet.py --workdir $(DEMO)/controlnet \
	  --config.data.data_dir=$(DEMO)/tfds --config.training.base_checkpoint=$(DEMO)/ldm
	$(PY) -m latent_diffusion_jax.cli.placement --controlnet $(DEMO)/controlnet \
	  --out $(DEMO)/placement --min_placement 0.85

# Image-conditioned models on the shared conditioning first stage, each measured
# on held-out test images with the issue's bars (cli/image_fidelity.py): inpainting a masked
# quadrant (caption's color and shape >= 80%, kept pixels no worse than the autoencoder's
# reconstruction), x4 super-resolution (above bicubic in PSNR and SSIM, detector agreement
# >= 95%), semantic map -> image (shape-pixel color agreement >= 80%).
demo-inpaint: venv $(DEMO_AE_LAYOUTS)/stage1.json
	$(PY) train.py --config configs/shapes_inpaint_ldm.py --workdir $(DEMO)/inpaint \
	  --config.data.data_dir=$(DEMO)/tfds --config.frozen.vae=$(DEMO_AE_LAYOUTS)
	$(PY) -m latent_diffusion_jax.cli.image_fidelity --task inpaint --checkpoint $(DEMO)/inpaint \
	  --out $(DEMO)/inpaint_fidelity --min_fidelity 0.8 --max_outside_gap_db 0 --keep_unmasked

demo-sr: venv $(DEMO_AE_LAYOUTS)/stage1.json
	$(PY) train.py --config configs/shapes_sr_ldm.py --workdir $(DEMO)/sr \
	  --config.data.data_dir=$(DEMO)/tfds --config.frozen.vae=$(DEMO_AE_LAYOUTS)
	$(PY) -m latent_diffusion_jax.cli.image_fidelity --task sr --checkpoint $(DEMO)/sr \
	  --out $(DEMO)/sr_fidelity --min_fidelity 0.95 --require_beats_bicubic

demo-semantic: venv $(DEMO_AE_LAYOUTS)/stage1.json
	$(PY) train.py --config configs/shapes_semantic_ldm.py --workdir $(DEMO)/semantic \
	  --config.data.data_dir=$(DEMO)/tfds --config.frozen.vae=$(DEMO_AE_LAYOUTS)
	$(PY) -m latent_diffusion_jax.cli.image_fidelity --task semantic --checkpoint $(DEMO)/semantic \
	  --out $(DEMO)/semantic_fidelity --min_agreement 0.8

clean:
	rm -rf $(VENV)
