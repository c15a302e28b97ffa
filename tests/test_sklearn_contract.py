"""The heads claim scikit-learn's classifier contract: scikit-learn's own estimator checks are the test."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from probe.heads import CosineKNN, LogisticProbe, TorchLinear, TorchMLP


def _expected_failed(estimator) -> dict:
    """Checks that do not apply to a head, each with the reason (scikit-learn's expected_failed_checks)."""
    return {}


@parametrize_with_checks([LogisticProbe(device="cpu"), TorchLinear(device="cpu"), TorchMLP(device="cpu"),
                          CosineKNN(device="cpu")], expected_failed_checks=_expected_failed)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)
