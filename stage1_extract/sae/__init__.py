"""The TopK sparse autoencoder of stage 1: model, io (OpenAI / SAELens / cocomix files), download,
stream (teacher activations), grad (sparse encoder backward), and ``sae train``: recipe (the
training step), state (the resume state), train (the command)."""
