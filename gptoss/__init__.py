"""gptoss: train a GPT-OSS-architecture language model from scratch with DeepSpeed."""
