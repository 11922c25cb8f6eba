"""`python -m tuner.grid` from a checkout: the same command as `python -m nfnet_keras.tuner.grid`."""
