"""Training: functional optimizers, the train step, data (tokenizer, chat rendering, packing, datasets), checkpoints."""
