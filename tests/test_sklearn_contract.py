"""The heads claim scikit-learn's classifier contract: scikit-learn's own estimator checks are the test.
Every check applies and passes; none is marked as an expected failure.

The torch heads are checked with fewer minimum steps and a narrower hidden layer than their defaults:
the contract (cloning, fitted attributes, input validation, classes, dtypes, pickling) is the same for
any setting, and the checks fit them dozens of times (at the defaults: 10 s more of the test suite).
The token heads are checked on plain rows, which they take as one token each (AttentiveProbe's
n_tokens 1; SegLinearProbe always classifies tokens, checked at lr 1e-2 for its fewer steps). AttentiveProbe declares scikit-learn's
`poor_score` tag: on one token of two features, the layer norm its recipe applies first leaves only the
sign of their difference, so the 83% training accuracy on 2-d blobs is out of reach by construction."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from probe.heads import AttentiveProbe, CosineKNN, LogisticProbe, SegLinearProbe, TorchLinear, TorchMLP, ZeroShotHead


@parametrize_with_checks([LogisticProbe(device="cpu"), TorchLinear(device="cpu", min_steps=150),
                          TorchMLP(device="cpu", hidden=64, min_steps=150), CosineKNN(device="cpu"),
                          CosineKNN(k=(1, 3, 5), temperature=0.07, device="cpu"),
                          ZeroShotHead(), AttentiveProbe(device="cpu", min_steps=60, mlp_ratio=1.0),
                          SegLinearProbe(device="cpu", min_steps=100, lr=1e-2)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)
