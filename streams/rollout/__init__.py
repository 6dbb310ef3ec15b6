"""New checkpoints to serving deployments: the deployer (`deployer.py`: judge, deploy, probe,
retire), the launchers that run (or render) worker replicas (`launchers.py`), and the canary
that shifts an alias step by step (`canary.py`)."""
