"""Helpers for tests that compare with PyTorch reference modules (diffusers, transformers)."""


def randomize(module, seed: int, scale: float = 0.1):
  """Fills every parameter of a torch module with seeded normal noise and returns it in eval mode.

  diffusers zero-initializes some output layers; random values exercise every weight.
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * scale)
  return module.eval()
