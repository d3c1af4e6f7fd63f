"""RandomAffine: identity at zero strength, reproducible from the generator, and geometrically
right (a blob moves by the drawn shift; a rotation keeps lengths)."""

from __future__ import annotations

import math

import pytest
import torch

from deepmetric.augment import RandomAffine


def blob(size: int = 32, cx: float = 15.5, cy: float = 15.5, sigma: float = 2.0) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    image = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
    return image[None, None].double()


def centroid(image: torch.Tensor) -> tuple[float, float]:
    h, w = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    mass = image.sum()
    return float((image * xs).sum() / mass), float((image * ys).sum() / mass)


def test_zero_strength_is_identity() -> None:
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    out = RandomAffine(0, 0, 0, 0)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-12, rtol=0)


def test_same_generator_state_same_batch_and_images_differ() -> None:
    x = blob().expand(4, 1, 32, 32).contiguous()
    augment = RandomAffine(rotation=20, shear=0.2, scale=0.1, translate=0.1)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # every image got its own distortion
    assert all(not torch.allclose(a[0], a[i]) for i in range(1, 4))


def test_translation_moves_the_blob_by_the_drawn_shift() -> None:
    augment = RandomAffine(rotation=0, shear=0, scale=0, translate=0.2)
    theta = augment.matrices(1, torch.Generator().manual_seed(1))[0]
    out = augment(blob(), torch.Generator().manual_seed(1))
    # output(p) = input(p + t): content moves by -t, t in [-1, 1] units (half the width = 1)
    expected_x = 15.5 - float(theta[0, 2]) * 16
    expected_y = 15.5 - float(theta[1, 2]) * 16
    cx, cy = centroid(out[0, 0])
    assert abs(theta[0, 2]) > 0.01
    assert cx == pytest.approx(expected_x, abs=0.05)
    assert cy == pytest.approx(expected_y, abs=0.05)


def test_rotation_only_is_a_rotation_within_the_limit() -> None:
    augment = RandomAffine(rotation=30, shear=0, scale=0, translate=0)
    theta = augment.matrices(64, torch.Generator().manual_seed(2))
    linear = theta[:, :, :2]
    eye = torch.eye(2, dtype=linear.dtype).expand(64, 2, 2)
    torch.testing.assert_close(linear @ linear.transpose(1, 2), eye)
    angles = torch.atan2(linear[:, 1, 0], linear[:, 0, 0])
    assert float(angles.abs().max()) <= math.radians(30) + 1e-12
    assert float(angles.abs().max()) > math.radians(15)  # the range is used
    torch.testing.assert_close(theta[:, :, 2], torch.zeros(64, 2, dtype=theta.dtype))


def test_scale_limits_the_determinant() -> None:
    augment = RandomAffine(rotation=0, shear=0, scale=0.25, translate=0)
    theta = augment.matrices(200, torch.Generator().manual_seed(4))
    size = 1 / theta[:, 0, 0]  # sampling divides by the size
    assert float(size.min()) >= 0.75 - 1e-12 and float(size.max()) <= 1.25 + 1e-12
    torch.testing.assert_close(theta[:, 0, 0], theta[:, 1, 1])


def test_float32_batch_keeps_dtype_and_shape() -> None:
    x = torch.rand(3, 1, 28, 28)
    out = RandomAffine()(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rotation": -1.0}, "rotation"),
        ({"shear": float("nan")}, "shear"),
        ({"scale": 1.0}, "scale"),
        ({"translate": float("inf")}, "translate"),
    ],
)
def test_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RandomAffine(**kwargs)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        RandomAffine()(torch.rand(28, 28), torch.Generator())
    with pytest.raises(ValueError, match="float"):
        RandomAffine()(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.Generator())


def test_run_config_key_builds_the_augmentation() -> None:
    from deepmetric.runs import RunConfig, build_augment

    config = RunConfig.from_dict({"augment": {"rotation": 5, "shear": 0}})
    augment = build_augment(config.augment)
    assert isinstance(augment, RandomAffine)
    assert (augment.rotation, augment.shear, augment.scale) == (5.0, 0.0, 0.15)
    assert build_augment(RunConfig.from_dict({}).augment) is None
    with pytest.raises(ValueError, match="unknown key.*'augment'.*angle"):
        RunConfig.from_dict({"augment": {"angle": 5}})
    with pytest.raises(ValueError, match="'augment' must be a mapping"):
        RunConfig.from_dict({"augment": 5})
    with pytest.raises(ValueError, match="'augment'.*scale"):
        RunConfig.from_dict({"augment": {"scale": 2}})


def test_command_line_flag_sets_and_clears_the_augmentation() -> None:
    from deepmetric.cli import build_parser, config_from_args

    parser = build_parser()
    on = config_from_args(parser.parse_args(["train", "--augment", "{rotation: 7}"]))
    assert on.augment == {"rotation": 7}
    defaults = config_from_args(parser.parse_args(["train", "--augment", "{}"]))
    assert defaults.augment == {}
    off = config_from_args(parser.parse_args(["train", "--augment", "null"]))
    assert off.augment is None


def _small_model() -> torch.nn.Module:
    from deepmetric.models import EmbeddingNet, SmallConvNet

    torch.manual_seed(0)
    return EmbeddingNet(SmallConvNet(1, 8, 2), 8, embedding_size=6).eval()


def test_embed_augmented_is_the_mean_of_the_copies() -> None:
    from deepmetric.augment import embed_augmented

    model = _small_model()
    x = torch.rand(7, 1, 16, 16)
    augment = RandomAffine()
    ours = embed_augmented(model, x, augment, copies=3, seed=11, batch_size=4)
    # the obvious loop: the image, then three distorted copies drawn in turn from the seed
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        embeddings = [model(x)] + [model(augment(x, generator)) for _ in range(3)]
    expected = torch.nn.functional.normalize(torch.stack(embeddings).mean(0), dim=1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    again = embed_augmented(model, x, augment, copies=3, seed=11)
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=1e-6)
    assert model.training is False


def test_embed_augmented_without_copies_or_distortion_is_the_plain_embedding() -> None:
    from deepmetric.augment import embed_augmented
    from deepmetric.training import embed

    model = _small_model()
    x = torch.rand(5, 1, 16, 16)
    plain = embed(model, x)  # the model L2-normalises
    torch.testing.assert_close(embed_augmented(model, x, RandomAffine(), copies=0), plain)
    identity = RandomAffine(0, 0, 0, 0)
    torch.testing.assert_close(
        embed_augmented(model, x, identity, copies=4), plain, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="copies"):
        embed_augmented(model, x, identity, copies=-1)


def test_test_time_augment_needs_augment_and_a_count() -> None:
    from deepmetric.runs import RunConfig

    assert RunConfig.from_dict({"augment": {}, "test_time_augment": 4}).test_time_augment == 4
    with pytest.raises(ValueError, match="needs the distortions"):
        RunConfig.from_dict({"test_time_augment": 4})
    with pytest.raises(ValueError, match="int >= 0"):
        RunConfig.from_dict({"augment": {}, "test_time_augment": -2})


def test_train_with_augmentation_scores_the_test_time_augmented_network(tmp_path) -> None:
    import json

    from deepmetric.cli import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--test-classes", "0.4", "--val-classes", "0"]
    args += ["--rotations", "false", "--epochs", "1", "--p", "3", "--k", "8", "--no-progress"]
    args += ["--set", "model.channels=8", "--set", "model.blocks=2", "--out", str(out)]
    assert main([*args, "--augment", "{rotation: 5}", "--test-time-augment", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [row["embedding"] for row in results["table"]]
    assert names[:3] == ["raw pixels", "untrained network", "trained network"]
    assert names[3] == "trained + test-time augmentation (2 copies)"
    assert 0.0 <= results["table"][3]["Recall@1"] <= 1.0
    # the verdict is about the network as trained, not about the test-time augmentation
    assert f"Recall@1 {results['table'][2]['Recall@1']:.3f} vs" in results["verdict"]
