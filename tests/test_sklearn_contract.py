"""The heads claim scikit-learn's classifier contract: scikit-learn's own estimator checks are the test.
Every check applies and passes; none is marked as an expected failure."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from probe.heads import CosineKNN, LogisticProbe, TorchLinear, TorchMLP


@parametrize_with_checks([LogisticProbe(device="cpu"), TorchLinear(device="cpu"), TorchMLP(device="cpu"),
                          CosineKNN(device="cpu")])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)
