"""The Blindfold SDK: attest the server, pin its key, then talk to it."""
