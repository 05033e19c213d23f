"""SSIM, LPIPS (random weights: code path only) and the stealthiness experiment."""

import json
import os

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import stealthiness as stealthiness_experiment
from ounl_jax import stealthiness

TINY = (8, 8, 8, 8, 8)


def _images(seed, n=4, shape=(32, 32, 3)):
  rng = np.random.default_rng(seed)
  return (rng.uniform(size=(n, *shape)) - 0.5).astype(np.float32)


def _noisy(images, sigma, seed=1):
  noise = np.random.default_rng(seed).normal(size=images.shape)
  return np.clip(images + sigma * noise, -0.5, 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_params():
  return stealthiness.random_lpips_params(jax.random.key(0), widths=TINY)


# --- SSIM -------------------------------------------------------------------------


def test_ssim_identical_is_one():
  x = _images(0)
  np.testing.assert_allclose(stealthiness.ssim(x, x), np.ones(len(x)), atol=1e-6)


def test_ssim_decreases_with_noise():
  x = _images(0)
  values = [np.asarray(stealthiness.ssim(x, _noisy(x, s))).mean()
            for s in (0.0, 0.01, 0.03, 0.1, 0.3)]
  assert values[0] == pytest.approx(1.0, abs=1e-6)
  assert all(a > b for a, b in zip(values, values[1:])), values


def test_ssim_constant_images_by_hand():
  # Constant images: variances are 0, so SSIM = (2ab + c1) / (a^2 + b^2 + c1) with
  # a, b the [0, 1] intensities and c1 = (0.01 * 1)^2.
  x = np.zeros((1, 16, 16, 3), np.float32)         # 0.5 in [0, 1]
  y = np.full((1, 16, 16, 3), 0.1, np.float32)     # 0.6 in [0, 1]
  c1 = 0.01**2
  expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
  # float32 variances (E[a^2] - E[a]^2) round to ~1e-8, against c2 = 9e-4.
  np.testing.assert_allclose(stealthiness.ssim(x, y), [expected], rtol=5e-4)


def test_ssim_is_dm_pix_on_shifted_images():
  x, y = _images(0), _noisy(_images(0), 0.05)
  np.testing.assert_allclose(stealthiness.ssim(x, y),
                             dm_pix.ssim(x + 0.5, y + 0.5, max_val=1.0),
                             rtol=1e-6)


def test_ssim_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same shape"):
    stealthiness.ssim(_images(0, n=2), _images(0, n=3))


# --- LPIPS ------------------------------------------------------------------------


def test_lpips_identical_is_exactly_zero(tiny_params):
  x = _images(2)
  assert np.all(np.asarray(stealthiness.lpips(tiny_params, x, x)) == 0.0)


def test_lpips_symmetric_and_non_negative(tiny_params):
  x, y = _images(3), _images(4)
  forward = np.asarray(stealthiness.lpips(tiny_params, x, y))
  backward = np.asarray(stealthiness.lpips(tiny_params, y, x))
  assert forward.shape == (len(x),)
  assert np.all(forward > 0)
  np.testing.assert_allclose(forward, backward, rtol=1e-5)


def test_lpips_increases_with_perturbation(tiny_params):
  x = _images(5)
  direction = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
  values = [np.asarray(stealthiness.lpips(tiny_params, x, x + s * direction)).mean()
            for s in (0.0, 0.01, 0.03, 0.1, 0.3)]
  assert values[0] == 0.0
  assert all(a < b for a, b in zip(values, values[1:])), values


def test_lpips_full_alexnet_shapes_on_cifar():
  params = stealthiness.random_lpips_params(jax.random.key(1))
  x = _images(7, n=2)
  taps = stealthiness.alexnet_features(params, x)
  assert [t.shape for t in taps] == [(2, 7, 7, 64), (2, 3, 3, 192), (2, 1, 1, 384),
                                     (2, 1, 1, 256), (2, 1, 1, 256)]
  assert np.all(np.isfinite(stealthiness.lpips(params, x, _noisy(x, 0.05))))


def test_first_tap_is_torch_conv_layout(tiny_params):
  # features.0: OIHW cross-correlation, stride 4, padding 2, then ReLU, on the
  # ScalingLayer's input ((2x - shift) / scale).
  x = _images(12, n=1)
  scaled = (2 * x[0] - np.asarray(stealthiness.LPIPS_SHIFT)) / np.asarray(
      stealthiness.LPIPS_SCALE)
  padded = np.pad(scaled, ((2, 2), (2, 2), (0, 0)))
  w = np.asarray(tiny_params["conv"][0]["w"])  # (O, I, 11, 11)
  b = np.asarray(tiny_params["conv"][0]["b"])
  tap = np.asarray(stealthiness.alexnet_features(
      tiny_params, stealthiness._scale_input(x))[0])[0]
  for i, j in ((0, 0), (3, 5), (6, 6)):
    window = padded[4 * i:4 * i + 11, 4 * j:4 * j + 11]  # (11, 11, I)
    expected = np.maximum(np.einsum("hwc,ochw->o", window, w) + b, 0)
    np.testing.assert_allclose(tap[i, j], expected, rtol=1e-4, atol=1e-5)


def test_lpips_is_the_formula(tiny_params):
  # sum_l mean_hw sum_c w_lc (f/|f| - g/|g|)^2, computed in numpy from the taps.
  x, y = _images(13, n=2), _images(14, n=2)
  taps_x = stealthiness.alexnet_features(tiny_params, stealthiness._scale_input(x))
  taps_y = stealthiness.alexnet_features(tiny_params, stealthiness._scale_input(y))
  expected = 0.0
  for fx, fy, lin in zip(taps_x, taps_y, tiny_params["lin"]):
    fx, fy = np.asarray(fx, np.float64), np.asarray(fy, np.float64)
    nx = fx / (np.linalg.norm(fx, axis=-1, keepdims=True) + 1e-10)
    ny = fy / (np.linalg.norm(fy, axis=-1, keepdims=True) + 1e-10)
    expected = expected + ((nx - ny)**2 * np.asarray(lin)).sum(-1).mean((1, 2))
  np.testing.assert_allclose(stealthiness.lpips(tiny_params, x, y), expected,
                             rtol=1e-4)


def test_lpips_does_not_recompile(tiny_params):
  x, y = _images(8), _images(9)
  stealthiness.lpips(tiny_params, x, y)
  size = stealthiness.lpips._cache_size()
  stealthiness.lpips(tiny_params, y, x)
  assert stealthiness.lpips._cache_size() == size


# --- LPIPS weights ----------------------------------------------------------------


def test_documented_shapes_are_the_official_ones():
  shapes = stealthiness.lpips_param_shapes()
  assert shapes["features.0.weight"] == (64, 3, 11, 11)
  assert shapes["features.3.weight"] == (192, 64, 5, 5)
  assert shapes["features.10.bias"] == (256,)
  assert shapes["lin0.model.1.weight"] == (1, 64, 1, 1)
  assert shapes["lin4.model.1.weight"] == (1, 256, 1, 1)
  assert len(shapes) == 15


def test_load_lpips_weights_round_trips(tmp_path, tiny_params):
  path = tmp_path / "weights.npz"
  arrays = stealthiness.lpips_params_to_arrays(tiny_params)
  assert set(arrays) == set(stealthiness.lpips_param_shapes(TINY))
  np.savez(path, scaling_layer_shift=np.zeros(3), **arrays)  # extras are ignored
  loaded = stealthiness.load_lpips_weights(path, widths=TINY)
  for a, b in zip(jax.tree_util.tree_leaves(loaded),
                  jax.tree_util.tree_leaves(tiny_params)):
    np.testing.assert_array_equal(a, b)
  x, y = _images(10), _images(11)
  np.testing.assert_array_equal(stealthiness.lpips(loaded, x, y),
                                stealthiness.lpips(tiny_params, x, y))


def test_load_lpips_weights_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="lpips.LPIPS"):
    stealthiness.load_lpips_weights(tmp_path / "absent.npz")


def test_load_lpips_weights_missing_key(tmp_path, tiny_params):
  arrays = stealthiness.lpips_params_to_arrays(tiny_params)
  del arrays["lin2.model.1.weight"]
  np.savez(tmp_path / "w.npz", **arrays)
  with pytest.raises(ValueError, match="lin2.model.1.weight"):
    stealthiness.load_lpips_weights(tmp_path / "w.npz", widths=TINY)


def test_load_lpips_weights_wrong_shape(tmp_path, tiny_params):
  np.savez(tmp_path / "w.npz", **stealthiness.lpips_params_to_arrays(tiny_params))
  with pytest.raises(ValueError, match=r"features.0.weight is \(8, 3, 11, 11\)"):
    stealthiness.load_lpips_weights(tmp_path / "w.npz")  # official widths expected


# --- pairs and summaries ----------------------------------------------------------


def test_sample_pairs_seeded_distinct_and_bounded():
  a = stealthiness.sample_pairs(jax.random.key(0), 100, 50)
  assert len(a) == 50 and len(set(a.tolist())) == 50 and a.max() < 100
  np.testing.assert_array_equal(a, stealthiness.sample_pairs(jax.random.key(0), 100))
  assert not np.array_equal(a, stealthiness.sample_pairs(jax.random.key(1), 100))
  np.testing.assert_array_equal(stealthiness.sample_pairs(jax.random.key(0), 7, 50),
                                np.arange(7))
  assert len(stealthiness.sample_pairs(jax.random.key(0), 0, 50)) == 0


def test_summarize():
  summary = stealthiness.summarize(jnp.asarray([1.0, 2.0, 3.0]))
  assert summary == {"mean": 2.0, "std": pytest.approx(np.std([1, 2, 3])),
                     "count": 3}
  assert stealthiness.summarize([]) == {"mean": None, "std": None, "count": 0}


# --- the experiment ---------------------------------------------------------------


def _write_pushed(path, n=12):
  original = _images(20, n=n)
  pushed = {}
  for name, sigma, seed in (("pushing_i", 0.02, 21), ("pushing_ii", 0.04, 22)):
    pushed[name] = _noisy(original, sigma, seed)
  success_i = np.ones(n, bool)
  success_i[[1, 5]] = False
  success_ii = np.ones(n, bool)
  success_ii[[0, 5, 7]] = False
  pushed["pushing_i"][~success_i] = np.nan
  pushed["pushing_ii"][~success_ii] = np.nan
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, original=original, pushing_i_success=success_i, pushing_ii_success=success_ii,
           ids=np.arange(100, 100 + n), **pushed)


def _run(workdir, **settings):
  """The experiment in-process (as ``python -m experiments.stealthiness``)."""
  config = stealthiness_experiment.StealthinessConfig(**settings)
  return stealthiness_experiment.run(config, str(workdir))


def test_experiment_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  _write_pushed(str(workdir / "attack" / "pushed.npz"))

  # Without --pushed it reads WORKDIR/attack/pushed.npz; no weights: LPIPS is null.
  json_path = _run(workdir, num_pairs=5, seed=3)
  assert json_path == str(workdir / "stealthiness.json")
  with open(json_path) as f:
    results = json.load(f)
  for method, successful in (("pushing_i", 10), ("pushing_ii", 9)):
    entry = results["methods"][method]
    assert entry["pairs"] == 5 and entry["successful"] == successful
    assert len(set(entry["ids"])) == 5
    assert 0.0 < entry["ssim"]["mean"] < 1.0 and entry["ssim"]["count"] == 5
    assert entry["lpips"] is None
    assert entry["lpips_note"] == ("no pretrained LPIPS weights given "
                                   "(--lpips_weights)")
  assert (results["methods"]["pushing_i"]["ssim"]["mean"]
          > results["methods"]["pushing_ii"]["ssim"]["mean"])  # less noise
  assert results["paper"]["pushing_i"]["ssim"]["mean"] == 0.9748
  assert results["config"]["num_pairs"] == 5
  table = (workdir / "stealthiness.md").read_text()
  assert "| Pushing-I | 0.9748 ± 0.0013 |" in table
  assert "n/a (no weights)" in table
  png = (workdir / "stealthiness_examples.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

  # With a weights file (random here: checks the code path only, not a number to
  # report) LPIPS values appear, from the full-size AlexNet shapes.
  weights = tmp_path / "random_lpips.npz"
  np.savez(weights, **stealthiness.lpips_params_to_arrays(
      stealthiness.random_lpips_params(jax.random.key(0))))
  other = tmp_path / "with_weights"
  path = _run(other, pushed=str(workdir / "attack" / "pushed.npz"),
              lpips_weights=str(weights), num_pairs=50)
  with open(path) as f:
    results = json.load(f)
  assert results["lpips"]["weights"] == str(weights)
  for method in ("pushing_i", "pushing_ii"):
    entry = results["methods"][method]
    assert entry["pairs"] == entry["successful"]  # fewer than 50 available
    assert entry["lpips"]["count"] == entry["pairs"] and entry["lpips"]["mean"] > 0


def test_experiment_missing_pushed_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match="python -m experiments.pushing --workdir=DIR"):
    _run(tmp_path)
  assert not (tmp_path / "stealthiness.json").exists()
