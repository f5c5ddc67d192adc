"""Training: the task-graph engine, the patch sampler, the training loop, the learning curve."""
