"""The Blindfold inference server: runs inside the TEE, serves the Open Inference Protocol."""
