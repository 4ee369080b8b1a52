"""The FID Inception-v3 against pytorch-fid, its weight file, and the FID / IS arithmetic.

pytorch-fid's network is built with its weight download replaced by a random state dict (BatchNorm
running statistics randomized too), which strict-loads into `fid_inception_v3`, so key names and
shapes are checked by PyTorch itself; our converter maps the same dict onto the Flax network.
"""

import hashlib
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from torchvision_import import import_torchvision

from latent_diffusion_jax.cli import convert_inception
from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, UserInputError
from latent_diffusion_jax.core.parallel import create_mesh
from latent_diffusion_jax.evaluation.feature_nets import inception, inception_weights
from latent_diffusion_jax.evaluation.metrics import fid
from latent_diffusion_jax.evaluation.metrics.inception_score import inception_score

pytestmark = pytest.mark.filterwarnings(
    "ignore:The `disp` argument is deprecated:DeprecationWarning",  # pytorch-fid's sqrtm call
    "ignore::scipy.linalg.LinAlgWarning")  # singular covariance products, on purpose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Image counts are small on purpose: the 299x299 network costs about 6 GFLOP per image.
IMAGE_COUNTS = {64: 3, 320: 2}


def _pytorch_fid():
  import_torchvision()
  import pytorch_fid.fid_score
  import pytorch_fid.inception
  return pytorch_fid


def random_state_dict(seed: int = 0):
  """A pytorch-fid-layout state dict (torch tensors) with random weights and BN statistics.

  Scales keep activations O(1) through the 94 conv+BN+ReLU layers, so the comparison is of
  numbers that matter, not of underflowed zeros.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for (_, *modules, leaf), ref in traverse_util.flatten_dict(inception.abstract_variables()).items():
    base, shape = ".".join(modules), ref.shape
    if leaf == "kernel" and len(shape) == 4:
      kh, kw, cin, cout = shape
      out[base + ".weight"] = rng.normal(0, np.sqrt(2 / (kh * kw * cin)), (cout, cin, kh, kw))
    elif leaf == "kernel":
      out[base + ".weight"] = rng.normal(0, 1 / np.sqrt(shape[0]), shape[::-1])
    elif leaf == "scale":
      out[base + ".weight"] = rng.uniform(0.5, 1.5, shape)
    elif leaf == "bias":
      out[base + ".bias"] = rng.normal(0, 0.1, shape)
    elif leaf == "mean":
      out[base + ".running_mean"] = rng.normal(0, 0.1, shape)
    elif leaf == "var":
      out[base + ".running_var"] = rng.uniform(0.5, 2.0, shape)
    else:
      raise AssertionError(f"unexpected leaf {leaf}")
  return {k: torch.from_numpy(v.astype(np.float32)) for k, v in out.items()}


@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict()


@pytest.fixture(scope="module")
def torch_inception(state_dict):
  pytorch_fid = _pytorch_fid()
  with mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url",
                         lambda *args, **kwargs: state_dict):
    model = pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True)
  fc = torch.nn.Linear(inception.FEATURE_DIM, inception.NUM_CLASSES)
  fc.load_state_dict({"weight": state_dict["fc.weight"], "bias": state_dict["fc.bias"]})
  return model.eval(), fc.eval()


@pytest.fixture(scope="module")
def variables(state_dict):
  return inception_weights.convert_state_dict({k: v.numpy() for k, v in state_dict.items()})


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  return {size: rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
          for size, n in IMAGE_COUNTS.items()}


@pytest.fixture(scope="module")
def jax_outputs(variables, images):
  """Our network on one device, per image size (computed once, shared by the tests)."""
  apply = jax.jit(inception.apply)
  return {size: jax.tree.map(np.asarray, apply(variables, x)) for size, x in images.items()}


def _relative(ours, reference):
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


# --- Input resizing ---------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("shape", [(64, 64), (320, 320), (500, 300), (17, 299), (299, 299)])
def test_resize_equals_torch_interpolate(shape):
  x = np.random.default_rng(2).uniform(0, 1, (2,) + shape + (3,)).astype(np.float32)
  reference = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(inception.resize_like_torch(jnp.asarray(x)))
  assert ours.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_antialiased_resize_would_not_match_torch():
  # Why resize_like_torch passes antialias=False: jax.image's default blurs when shrinking.
  x = np.random.default_rng(3).uniform(0, 1, (1, 320, 320, 3)).astype(np.float32)
  reference = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).numpy()
  default = np.asarray(jax.image.resize(jnp.asarray(x), (1, 299, 299, 3), method="bilinear"))
  assert np.abs(default - reference).max() > 1e-2


# --- The network --------------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("size", sorted(IMAGE_COUNTS))
def test_features_and_logits_equal_pytorch_fid(size, torch_inception, images, jax_outputs):
  model, fc = torch_inception
  with torch.no_grad():
    pool3 = model(torch.from_numpy(images[size]).permute(0, 3, 1, 2))[0]
    assert pool3.shape == (IMAGE_COUNTS[size], 2048, 1, 1)
    pool3 = pool3[:, :, 0, 0]
    logits = fc(pool3).numpy()
  pool3 = pool3.numpy()
  ours = jax_outputs[size]
  assert ours["features"].shape == (IMAGE_COUNTS[size], 2048)
  assert ours["logits"].shape == (IMAGE_COUNTS[size], 1008)
  # Random weights still give informative activations (not collapsed to zero by the ReLUs).
  assert (pool3 > 0).mean() > 0.5 and np.abs(pool3).max() > 0.5
  assert _relative(ours["features"], pool3) < 1e-4
  assert _relative(ours["logits"], logits) < 1e-4
  # Distinct images give distinct features: the comparison is not of a constant.
  assert np.abs(pool3[0] - pool3[1]).max() > 1e-2 * np.abs(pool3).max()


def test_extract_on_8_device_mesh_equals_single_device(variables, images, jax_outputs):
  net = inception_weights.feature_net(variables)
  assert (net.name, net.dim) == ("inception", 2048)
  mesh = create_mesh({"data": 4, "fsdp": 2})
  assert mesh.devices.size == 8
  # 3 images on 8 shards: the padding is computed and dropped.
  out = net.extract(images[64], batch_size=8, mesh=mesh)
  assert out["features"].shape == (3, 2048) and out["features"].dtype == np.float64
  # Same per-image math; only the float rounding of a different batch layout may differ.
  assert _relative(out["features"], jax_outputs[64]["features"]) < 1e-5
  assert _relative(out["logits"], jax_outputs[64]["logits"]) < 1e-5


# --- Weight conversion ----------------------------------------------------------------------------------

def test_convert_cli_round_trip(tmp_path, state_dict, variables):
  pth = tmp_path / "weights.pth"
  torch.save(state_dict, pth)
  # A file with the hub's name is checked against the hash in its name; this one carries its own.
  sha = hashlib.sha256(pth.read_bytes()).hexdigest()
  named = tmp_path / f"pt_inception-2015-12-05-{sha[:8]}.pth"
  pth.rename(named)
  out = str(tmp_path / "weights" / "inception_fid.safetensors")
  assert convert_inception.main(["--pth", str(named), "--out", out]) == out

  loaded = inception_weights.load(out)
  assert (loaded.name, loaded.dim) == ("inception", 2048)
  flat_loaded = traverse_util.flatten_dict(loaded.params)
  flat_expected = traverse_util.flatten_dict(variables)
  assert flat_loaded.keys() == flat_expected.keys()
  for key, value in flat_expected.items():
    np.testing.assert_array_equal(flat_loaded[key], value, err_msg="/".join(key))
  # Layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out), BN statistics in batch_stats.
  np.testing.assert_array_equal(flat_loaded[("params", "Mixed_6b", "branch7x7_2", "conv", "kernel")],
                                state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat_loaded[("params", "fc", "kernel")], state_dict["fc.weight"].numpy().T)
  np.testing.assert_array_equal(flat_loaded[("batch_stats", "Mixed_7c", "branch_pool", "bn", "var")],
                                state_dict["Mixed_7c.branch_pool.bn.running_var"].numpy())

  # The file loads without torch (a fresh interpreter that never imports it).
  code = ("import sys; from latent_diffusion_jax.evaluation.feature_nets import inception_weights as w;"
          f"net = w.load({out!r}); assert 'torch' not in sys.modules, 'torch imported';"
          "print(net.name, net.dim)")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["inception", "2048"]


def test_convert_refuses_a_damaged_hub_file(tmp_path, state_dict):
  pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save({"fc.bias": state_dict["fc.bias"]}, pth)
  with pytest.raises(SystemExit) as exit_info:
    convert_inception.main(["--pth", str(pth), "--out", str(tmp_path / "x.safetensors")])
  message = str(exit_info.value.code)
  assert "InputFileError" in message and "6726825d" in message and "sha256" in message
  assert not (tmp_path / "x.safetensors").exists()


def test_converter_names_what_does_not_fit(state_dict):
  # torchvision's own Inception-v3: 1000 classes and an auxiliary head.
  wrong = {k: v.numpy() for k, v in state_dict.items() if not k.startswith("Mixed_7c.branch_pool")}
  wrong["fc.weight"] = np.zeros((1000, 2048), np.float32)
  wrong["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  with pytest.raises(InputFileError) as error:
    inception_weights.convert_state_dict(wrong)
  message = str(error.value)
  assert "params/Mixed_7c/branch_pool/conv/kernel" in message
  assert "batch_stats/Mixed_7c/branch_pool/bn/mean" in message
  assert "AuxLogits" in message
  assert "fc.weight" in message and "(2048, 1000)" in message


def test_missing_weights_name_the_convert_command(tmp_path):
  path = str(tmp_path / "weights" / "inception_fid.safetensors")
  with pytest.raises(MissingInputError) as error:
    inception_weights.load(path)
  assert ("python -m latent_diffusion_jax.cli.convert_inception --pth "
          f"pt_inception-2015-12-05-6726825d.pth --out {path}") in str(error.value)
  assert inception_weights.PTH_URL in str(error.value)
  # The default path is the one the command writes by default.
  assert inception_weights.convert_command().endswith("--out weights/inception_fid.safetensors")
  # Given the PyTorch file itself: the command for it.
  with pytest.raises(InputFileError, match="convert_inception --pth some/pt_inception.pth"):
    inception_weights.load("some/pt_inception.pth")
  # The command line with a missing input: a message, no traceback.
  with pytest.raises(SystemExit) as exit_info:
    convert_inception.main(["--pth", str(tmp_path / "nope.pth"), "--out", path])
  assert "convert_inception: MissingInputError" in str(exit_info.value.code)
  assert "nope.pth" in str(exit_info.value.code)


def test_load_rejects_a_foreign_or_incomplete_file(tmp_path, variables):
  from safetensors.numpy import save_file
  foreign = str(tmp_path / "foreign.safetensors")
  save_file({"x": np.zeros(3, np.float32)}, foreign)
  with pytest.raises(InputFileError, match="not an FID Inception file"):
    inception_weights.load(foreign)
  partial = traverse_util.flatten_dict(variables)
  del partial[("params", "fc", "bias")]
  path = inception_weights.save(traverse_util.unflatten_dict(partial),
                                str(tmp_path / "partial.safetensors"))
  with pytest.raises(InputFileError, match="missing \\(1\\): params/fc/bias"):
    inception_weights.load(path)


# --- Frechet distance and statistics files --------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("n,dim", [(300, 16), (10, 32), (600, 256), (100, 256)],
                         ids=["full-rank", "singular", "wide", "wide-singular"])
def test_frechet_distance_equals_pytorch_fid(n, dim):
  pytorch_fid = _pytorch_fid()
  rng = np.random.default_rng(4)
  a = fid.feature_stats(rng.normal(0, 1, (n, dim)))
  b = fid.feature_stats(rng.normal(0.3, 1.5, (n, dim)) @ rng.normal(0, 1, (dim, dim)))
  if n < dim:
    assert np.linalg.matrix_rank(a.sigma) < dim  # the case pytorch-fid special-cases
  reference = pytorch_fid.fid_score.calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
  ours = fid.frechet_distance(a, b)
  assert ours > 1.0
  assert abs(ours - reference) <= 1e-6 * abs(reference)
  assert abs(fid.frechet_distance(a, a)) < 1e-6 * ours


def test_frechet_distance_of_an_exactly_singular_product_is_pytorch_fids_eps_branch(capsys):
  # A feature constant in both sets makes S_a S_b exactly singular. Older SciPy returned NaNs for
  # its square root and pytorch-fid then adds eps = 1e-6 to both diagonals; ours needs no eps
  # (eigenvalues rounded below zero are clipped): it equals pytorch-fid on today's SciPy (no eps)
  # and differs from the eps branch by what the eps moves: O(eps) per feature, ~2e-5 here.
  pytorch_fid = _pytorch_fid()
  from scipy import linalg
  real_sqrtm = linalg.sqrtm

  def old_sqrtm(matrix, *args, **kwargs):
    if np.linalg.matrix_rank(matrix) < len(matrix):
      root = np.full_like(matrix, np.nan)
      return (root, np.inf) if kwargs.get("disp", True) is False else root
    return real_sqrtm(matrix, *args, **kwargs)

  rng = np.random.default_rng(5)
  xa, xb = rng.normal(0, 1, (50, 8)), rng.normal(0.5, 2, (50, 8))
  xa[:, 3], xb[:, 3] = 1.0, 2.0
  a, b = fid.feature_stats(xa), fid.feature_stats(xb)
  with mock.patch.object(linalg, "sqrtm", old_sqrtm):
    reference = pytorch_fid.fid_score.calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
  assert "adding 1e-06 to diagonal" in capsys.readouterr().out  # pytorch-fid took that branch
  without_eps = pytorch_fid.fid_score.calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
  ours = fid.frechet_distance(a, b)
  assert np.isfinite(ours) and ours > 1.0
  assert abs(ours - without_eps) <= 1e-6 * abs(without_eps)
  assert abs(ours - reference) <= 1e-5 * abs(reference)


def test_stats_files_interchange_with_pytorch_fid(tmp_path):
  pytorch_fid = _pytorch_fid()
  rng = np.random.default_rng(6)
  stats = fid.feature_stats(rng.normal(0, 1, (40, 6)))
  ours = str(tmp_path / "ours.npz")
  fid.save_stats(ours, stats)
  mu, sigma = pytorch_fid.fid_score.compute_statistics_of_path(ours, None, 1, 6, "cpu")
  np.testing.assert_array_equal(mu, stats.mu)
  np.testing.assert_array_equal(sigma, stats.sigma)
  assert fid.load_stats(ours).count == 40

  # pytorch-fid's --save-stats writes a compressed npz with mu and sigma only.
  theirs = str(tmp_path / "theirs.npz")
  np.savez_compressed(theirs, mu=stats.mu.astype(np.float32), sigma=stats.sigma.astype(np.float32))
  loaded = fid.load_stats(theirs)
  assert loaded.count == 0 and loaded.dim == 6
  np.testing.assert_allclose(loaded.sigma, stats.sigma, rtol=1e-6)


def test_fid_errors_carry_the_numbers(tmp_path):
  rng = np.random.default_rng(7)
  a, b = fid.feature_stats(rng.normal(size=(5, 2048))), fid.feature_stats(rng.normal(size=(5, 768)))
  with pytest.raises(UserInputError, match="2048 vs 768"):
    fid.frechet_distance(a, b)
  with pytest.raises(UserInputError, match=r"at least 2 images.*got 1.*2048"):
    fid.feature_stats(rng.normal(size=(1, 2048)))
  with pytest.raises(MissingInputError, match="nope.npz"):
    fid.load_stats(str(tmp_path / "nope.npz"))
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, mean=np.zeros(3))
  with pytest.raises(InputFileError, match="'mu' and 'sigma'"):
    fid.load_stats(bad)


# --- Inception Score ----------------------------------------------------------------------------------

def _torch_fidelity_isc(logits: np.ndarray, splits: int, seed: int):
  """torch-fidelity's `isc_features_to_metric` (shuffle on), restated in torch for comparison."""
  feature = torch.from_numpy(logits)[np.random.RandomState(seed).permutation(len(logits))].double()
  p, log_p = feature.softmax(dim=1), feature.log_softmax(dim=1)
  n, scores = len(feature), []
  for i in range(splits):
    chunk = slice(i * n // splits, (i + 1) * n // splits)
    q = p[chunk].mean(dim=0, keepdim=True)
    scores.append((p[chunk] * (log_p[chunk] - q.log())).sum(dim=1).mean().exp().item())
  return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("splits", [1, 2])
def test_inception_score_of_confident_uniform_classes_is_the_class_count(splits):
  classes = 5
  logits = 60.0 * np.tile(np.eye(classes), (4, 1))  # every class twice per split, softmax ~ one-hot
  mean, std = inception_score(logits, splits=splits)
  assert mean == pytest.approx(classes, rel=1e-9)
  assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_of_identical_predictions_is_one():
  logits = np.tile(np.random.default_rng(8).normal(size=(1, 1008)), (12, 1))
  mean, std = inception_score(logits, splits=3)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_two_class_hand_computed():
  import math
  p = np.array([[0.9, 0.1], [0.2, 0.8]])
  # marginal (0.55, 0.45); IS = exp(mean of the two KLs)
  kl1 = 0.9 * math.log(0.9 / 0.55) + 0.1 * math.log(0.1 / 0.45)
  kl2 = 0.2 * math.log(0.2 / 0.55) + 0.8 * math.log(0.8 / 0.45)
  mean, std = inception_score(np.log(p), splits=1)
  assert mean == pytest.approx(math.exp((kl1 + kl2) / 2), rel=1e-12)
  assert std == 0.0


def test_inception_score_equals_torch_fidelity_formula():
  logits = np.random.default_rng(9).normal(0, 3, (23, 10))  # 23 = 5 uneven splits
  ours = inception_score(logits, splits=5, shuffle_seed=2020)
  reference = _torch_fidelity_isc(logits, splits=5, seed=2020)
  np.testing.assert_allclose(ours, reference, rtol=1e-12)
  # Without the shuffle: the original code's order, which for these logits is another score.
  assert inception_score(logits, splits=5)[0] != pytest.approx(ours[0], rel=1e-6)


def test_inception_score_errors():
  with pytest.raises(UserInputError, match="at least 10 images, got 4"):
    inception_score(np.zeros((4, 3)))
  with pytest.raises(UserInputError, match=r"\[N, classes\]"):
    inception_score(np.zeros(7), splits=1)
