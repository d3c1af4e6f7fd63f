"""EmbeddingTransformer: scikit-learn pipelines on real data (digits), agreement with the same
projection done in numpy, clone/get_params, scikit-learn's own estimator checks, validation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError, SkipTestWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import check_estimator
from torch import Tensor, nn

from deepmetric.estimators import EmbeddingTransformer
from deepmetric.fewshot import KNNClassifier, PrototypeClassifier
from deepmetric.models import EmbeddingNet, SmallConvNet


def _projection(seed: int = 0, n_in: int = 64, n_out: int = 32) -> nn.Linear:
    """A random projection (Johnson-Lindenstrauss style) as a stand-in for a trained model."""
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def _numpy_projection(linear: nn.Linear) -> FunctionTransformer:
    """The same projection done by scikit-learn in float64: the independent reference."""
    weight = linear.weight.detach().double().numpy()
    bias = linear.bias.detach().double().numpy()
    return FunctionTransformer(lambda x: x @ weight.T + bias)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return tuple(train_test_split(x, y, test_size=0.3, random_state=0, stratify=y))


class RowStatistics(nn.Module):
    """Accepts any number of features (scikit-learn's checks feed arbitrary 2-D arrays)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 2.0, 0.5]))

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return torch.stack([x.mean(1), x.amax(1), x.amin(1)], dim=1) * self.scale


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 7, 256, 10_000])
def test_transform_equals_the_projection_in_numpy(batch_size: int) -> None:
    x = np.random.default_rng(0).normal(size=(50, 64))
    linear = _projection()
    emb = EmbeddingTransformer(linear, batch_size=batch_size).fit_transform(x)
    assert emb.dtype == np.float32 and emb.shape == (50, 32)
    expected = _numpy_projection(linear).transform(x)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "classifier",
    [SVC(), KNeighborsClassifier(), GaussianNB(), PrototypeClassifier(), KNNClassifier(3)],
    ids=lambda c: type(c).__name__,
)
def test_pipelines_on_digits_agree_with_the_numpy_projection(
    digits: tuple[np.ndarray, ...], classifier: object
) -> None:
    x_train, x_test, y_train, y_test = digits
    linear = _projection()
    ours = make_pipeline(EmbeddingTransformer(linear), clone(classifier)).fit(x_train, y_train)
    reference = make_pipeline(_numpy_projection(linear), clone(classifier))
    reference.fit(x_train, y_train)
    predicted = ours.predict(x_test)
    # float32 embeddings against float64 ones: at most a borderline sample may differ
    assert int((predicted != reference.predict(x_test)).sum()) <= 2
    assert ours.score(x_test, y_test) > 0.85  # a random projection keeps digits separable


def test_conv_model_with_input_shape_on_digits(digits: tuple[np.ndarray, ...]) -> None:
    x_train, x_test, y_train, y_test = digits
    torch.manual_seed(0)
    model = EmbeddingNet(SmallConvNet(channels=16, blocks=2), 16, embedding_size=8)
    model.eval()
    transformer = EmbeddingTransformer(model, batch_size=100, input_shape=(1, 8, 8))
    emb = transformer.fit(x_train).transform(x_test)
    assert emb.shape == (len(x_test), 8)
    with torch.no_grad():
        expected = model(torch.tensor(x_test, dtype=torch.float32).reshape(-1, 1, 8, 8))
    np.testing.assert_allclose(emb, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)  # normalised
    # images given as (N, 1, 8, 8) directly give the same embeddings
    images = x_test.reshape(-1, 1, 8, 8)
    np.testing.assert_allclose(EmbeddingTransformer(model).fit_transform(images), emb, rtol=1e-6)
    pipe = make_pipeline(EmbeddingTransformer(model, input_shape=(1, 8, 8)), KNNClassifier(5))
    assert 0.0 < pipe.fit(x_train, y_train).score(x_test, y_test) <= 1.0


# --------------------------------------------------------------------------------------------
# scikit-learn conventions
# --------------------------------------------------------------------------------------------
def test_fit_learns_nothing_and_leaves_the_model_as_it_was() -> None:
    linear = _projection()
    linear.train()
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    transformer = EmbeddingTransformer(linear)
    assert transformer.fit(np.ones((4, 64))) is transformer
    transformer.transform(np.ones((3, 64)))
    assert transformer.model is linear and linear.training  # training flag restored
    for key, value in linear.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert transformer.n_features_in_ == 64 and transformer.embedding_size_ == 32
    assert list(transformer.get_feature_names_out()[:2]) == [
        "embeddingtransformer0",
        "embeddingtransformer1",
    ]


def test_eval_mode_is_used_for_embedding() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(p=0.9)).train()
    x = np.random.default_rng(1).normal(size=(20, 4))
    transformer = EmbeddingTransformer(model).fit(x)
    np.testing.assert_array_equal(transformer.transform(x), transformer.transform(x))


def test_get_params_set_params_and_clone() -> None:
    linear = _projection()
    transformer = EmbeddingTransformer(linear, batch_size=32, input_shape=None)
    params = transformer.get_params()
    assert params == {"model": linear, "batch_size": 32, "device": "cpu", "input_shape": None}
    assert transformer.set_params(batch_size=8) is transformer and transformer.batch_size == 8
    transformer.fit(np.zeros((2, 64)))
    copy = clone(transformer)
    # scikit-learn deep-copies parameters that are not estimators: an independent model
    assert copy.model is not linear and copy.batch_size == 8
    for a, b in zip(copy.model.parameters(), linear.parameters(), strict=True):
        assert a is not b
        torch.testing.assert_close(a, b)
    assert not hasattr(copy, "embedding_size_")  # a clone is unfitted
    with pytest.raises(NotFittedError):
        copy.transform(np.zeros((2, 64)))
    x = np.random.default_rng(2).normal(size=(5, 64))
    np.testing.assert_array_equal(copy.fit_transform(x), transformer.transform(x))


def test_grid_search_over_a_pipeline(digits: tuple[np.ndarray, ...]) -> None:
    x_train, _, y_train, _ = digits
    pipe = make_pipeline(EmbeddingTransformer(_projection()), KNeighborsClassifier())
    search = GridSearchCV(pipe, {"kneighborsclassifier__n_neighbors": [1, 5]}, cv=2)
    search.fit(x_train[:300], y_train[:300])
    assert search.best_params_["kneighborsclassifier__n_neighbors"] in (1, 5)
    assert search.best_score_ > 0.7


def test_scikit_learn_estimator_checks() -> None:
    """scikit-learn's ``check_estimator``, with a model that accepts any number of features.

    Does not apply: ``check_estimators_overwrite_params`` compares ``joblib.hash`` of every
    parameter before and after ``fit`` with a deep copy taken before; a torch module and its
    deep copy never hash alike (tensor pickles differ), even untouched. That fit leaves the
    model untouched is tested directly above.
    """
    not_applicable = {
        "check_estimators_overwrite_params": "torch modules and their deep copies hash apart"
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkipTestWarning)
        results = check_estimator(
            EmbeddingTransformer(RowStatistics()),
            on_fail=None,
            expected_failed_checks=not_applicable,
        )
    statuses = {r["check_name"]: r["status"] for r in results}
    failed = {name: s for name, s in statuses.items() if s not in ("passed", "skipped", "xfail")}
    assert not failed, failed
    assert sum(s == "passed" for s in statuses.values()) >= 40


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_value_errors() -> None:
    x = np.zeros((3, 64))
    linear = _projection()
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        EmbeddingTransformer(lambda t: t).fit(x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        EmbeddingTransformer(linear, batch_size=0).fit(x)
    with pytest.raises(ValueError, match="not a valid torch device"):
        EmbeddingTransformer(linear, device="toaster").fit(x)
    with pytest.raises(ValueError, match="input_shape must be a tuple"):
        EmbeddingTransformer(linear, input_shape=(8, -8)).fit(x)
    with pytest.raises(ValueError, match="cannot be reshaped to input_shape"):
        EmbeddingTransformer(linear, input_shape=(1, 7, 7)).fit(x)
    with pytest.raises(ValueError, match="the model failed on a batch of shape"):
        EmbeddingTransformer(linear).fit(np.zeros((3, 10)))
    with pytest.raises(ValueError, match="NaN"):
        EmbeddingTransformer(linear).fit(np.full((3, 64), np.nan))
    with pytest.raises(ValueError, match="one row per input sample"):
        EmbeddingTransformer(nn.Flatten(0)).fit(x)
    fitted = EmbeddingTransformer(linear).fit(x)
    with pytest.raises(
        ValueError, match="X has 10 features, but EmbeddingTransformer is expecting"
    ):
        fitted.transform(np.zeros((3, 10)))
    with pytest.raises(ValueError, match="fitted on samples of shape"):
        fitted.transform(np.zeros((3, 1, 8, 8)))
    with pytest.raises(NotFittedError):
        EmbeddingTransformer(linear).transform(x)
