#!/usr/bin/env python3
"""Makes tests/fixtures/diffusers/training-steps.safetensors: three training steps of the fixture
UNet (tiny-pipeline/, made by make_diffusers_fixture.py) computed by PyTorch and diffusers, for the
test that ddpm's training step computes the same update.

The step is the one a diffusers training loop takes: DDPMScheduler.add_noise on the linear
schedule, epsilon prediction, each image's MSE weighted by min(SNR_t, 5) / SNR_t (min-SNR-gamma),
the mean over the batch, clip_grad_norm_ at 1.0, torch.optim.AdamW (betas 0.9/0.999, eps 1e-8,
weight decay 0.01), then the EMA. Two conventions are ddpm's rather than diffusers' own helpers',
so that the test compares the update and not them:
  - step s (0-based) runs at lr * (s + 1) / warmup during warm-up (get_cosine_schedule_with_warmup
    runs the first step at 0);
  - update s of the EMA uses decay (1 + s) / (10 + s) (EMAModel uses 0 for the first update and
    the same value from the second on).

What it writes (the initial weights are tiny-pipeline's):
for each step s,
`x0.<s>`, `t.<s>`, `noise.<s>`, `loss.<s>`, `grad_norm.<s>`, `lr.<s>`; after the last step
`model.<name>` and `ema.<name>` under diffusers' parameter names, and `signal.<name>`: 1 (as
float16) for the weights whose gradient was above SIGNAL at every step.

Usage: py=$(bash tools/python_env.sh) && $py tools/make_step_fixture.py
"""
import pathlib

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/diffusers"
STEPS, BATCH, LR, WARMUP, GAMMA = 3, 4, 1e-3, 200, 5.0
# A gradient this size outweighs AdamW's eps (1e-8) and its rounding errors (a gradient that is
# zero in exact arithmetic, such as that of a bias the GroupNorm after it subtracts again, comes
# out near 1e-9): the weights it moves must agree between implementations.
SIGNAL = 1e-6


def main() -> None:
    torch.use_deterministic_algorithms(True)
    unet = UNet2DModel.from_pretrained(FIXTURES / "tiny-pipeline", subfolder="unet").float().train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")
    snr = scheduler.alphas_cumprod.double() / (1 - scheduler.alphas_cumprod.double())
    weight = (snr.clamp(max=GAMMA) / snr).float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ema = {name: p.detach().clone() for name, p in unet.named_parameters()}
    signal = {name: torch.ones_like(p, dtype=torch.bool) for name, p in unet.named_parameters()}
    generator = torch.Generator().manual_seed(5)
    out = {}
    for s in range(STEPS):
        x0 = torch.rand(BATCH, unet.config.in_channels, 16, 16, generator=generator) * 2 - 1
        t = torch.tensor([3, 250, 600, 999], dtype=torch.int64).roll(s)
        noise = torch.randn(x0.shape, generator=generator)
        lr = LR * (s + 1) / WARMUP
        for group in optimizer.param_groups:
            group["lr"] = lr
        prediction = unet(scheduler.add_noise(x0, noise, t), t).sample
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weight[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for name, p in unet.named_parameters():
            signal[name] &= p.grad.abs() > SIGNAL
        optimizer.step()
        decay = (1 + s) / (10 + s)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                ema[name].lerp_(p, 1 - decay)
        out.update({f"x0.{s}": x0, f"t.{s}": t, f"noise.{s}": noise, f"loss.{s}": loss.detach(), f"grad_norm.{s}": grad_norm, f"lr.{s}": torch.tensor(lr, dtype=torch.float64)})
        print(f"step {s}: loss {loss.item():.6f}, grad norm {grad_norm.item():.4f}, lr {lr:.2e}")
    for name, p in unet.named_parameters():
        out[f"model.{name}"] = p.detach().contiguous()
        out[f"ema.{name}"] = ema[name].contiguous()
        out[f"signal.{name}"] = signal[name].half()
    print(f"{sum(int(m.sum()) for m in signal.values())} of {sum(m.numel() for m in signal.values())} weights have gradients above {SIGNAL:g} at every step")
    save_file(out, str(FIXTURES / "training-steps.safetensors"))


if __name__ == "__main__":
    main()
