"""The model lifecycle, outside the worker: the verified model store (`store.py`), the
checkpoint judge that says whether a directory is a servable checkpoint (`judge.py`), the
demo trainer (`trainer.py`) and the tiny-model factory tests and the demo build from
(`factory.py`). Layers: `workers` <- `models` <- `streams` (the deployer) and `ferry`.
"""
