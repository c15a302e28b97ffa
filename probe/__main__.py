"""`python -m probe` (and `torchrun ... -m probe extract ...`): the probe command."""

from probe.cli import main

main()
