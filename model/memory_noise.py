"""Memory noise between segments (config.memory_noise, memory_noise_prob; training mode only)."""

import torch


def perturbed(memory: torch.Tensor, sigma: float, prob: float) -> torch.Tensor:
    """memory [B, M, D] + sigma * rms(memory) * N(0, 1), the rms per slot and not differentiated;
    with prob < 1 only a random fraction prob of the samples get it."""
    rms = memory.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(memory.dtype)  # [B, M, 1]
    noise = sigma * rms * torch.randn_like(memory)
    if prob < 1:
        # Drawn after the noise, so prob = 1 draws exactly what it always did.
        noisy = torch.rand(memory.shape[0], 1, 1, device=memory.device) < prob  # [B, 1, 1]
        noise = noise * noisy.to(noise.dtype)
    return memory + noise
