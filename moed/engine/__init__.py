"""The engine process: the only place moed imports MLX (model, scheduling, sampling)."""
