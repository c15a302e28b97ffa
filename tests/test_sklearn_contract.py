"""The heads claim scikit-learn's classifier contract: scikit-learn's own estimator checks are the test.
Every check applies and passes; none is marked as an expected failure.

The torch heads are checked with fewer minimum steps and a narrower hidden layer than their defaults:
the contract (cloning, fitted attributes, input validation, classes, dtypes, pickling) is the same for
any setting, and the checks fit them dozens of times (at the defaults: 10 s more of the test suite)."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from probe.heads import CosineKNN, LogisticProbe, TorchLinear, TorchMLP, ZeroShotHead


@parametrize_with_checks([LogisticProbe(device="cpu"), TorchLinear(device="cpu", min_steps=150),
                          TorchMLP(device="cpu", hidden=64, min_steps=150), CosineKNN(device="cpu"),
                          CosineKNN(k=(1, 3, 5), temperature=0.07, device="cpu"),
                          ZeroShotHead()])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)
