from .gpt import GPT, flops_per_token, count_params

__all__ = ["GPT", "flops_per_token", "count_params"]
