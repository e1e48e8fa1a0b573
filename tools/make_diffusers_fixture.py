#!/usr/bin/env python3
"""Makes the diffusers parity fixture under tests/fixtures/diffusers/ (run once; the files are
committed, so the Rust tests need neither Python nor diffusers).

What it writes:
  tiny-pipeline/        a genuine DDPMPipeline folder saved by diffusers: a small UNet2DModel
                        (block_out_channels (32, 32), one residual block per level, attention at
                        8x8, 16x16 RGB) with random weights from a fixed seed, stored in float16
                        to keep the file small, and a DDPMScheduler (squaredcos_cap_v2,
                        v_prediction) so that import has non-default values to carry over.
  parity.safetensors    `sample`, `timestep` and diffusers' float32 CPU output `output` for that
                        UNet, plus diffusers' betas (`betas.<schedule>`) for T = 1000 under the
                        three schedules ddpm can express.
  tiny-class-pipeline/  the same UNet at 64 channels with a class embedding (num_class_embeds =
                        4: three classes and ddpm's "no class", the last row), saved the same way.
  class-parity.safetensors
                        `sample`, `timestep`, `class_labels` (each class and "no class") and
                        diffusers' float32 CPU output `output` for the class-conditional UNet.
  tiny-adm-pipeline/    a class-conditional UNet with every option of the ADM network (Dhariwal &
                        Nichol 2021) that diffusers expresses: attention at 16x16 and 4x4 with
                        16-channel heads, the time embedding as a scale and shift of the norm
                        (resnet_time_scale_shift = "scale_shift") and residual blocks that
                        resample (downsample_type = upsample_type = "resnet").
  adm-parity.safetensors
                        its `sample`, `timestep`, `class_labels` and float32 CPU `output`.
  adm_presets.json      the UNet2DModel arguments equivalent to ADM's published ImageNet 64 and
                        256 networks (ddpm's imagenet64 and imagenet256 presets) and the
                        parameter count diffusers gives each.
  cifar10_tensor_shapes.json
                        every tensor name and shape of the UNet2DModel that matches our cifar10
                        preset (the google/ddpm-cifar10-32 layout), so that the name mapping is
                        checked against diffusers at full size without shipping its weights.

Usage (diffusers in a throwaway venv that sees the project's torch 2.11):
  python3 -m venv /tmp/dfenv
  echo ~/.cache/ddpm/torch-2.11.0/lib/python3.11/site-packages \
      > /tmp/dfenv/lib/python3.11/site-packages/ddpm_torch.pth
  /tmp/dfenv/bin/pip install diffusers safetensors numpy
  /tmp/dfenv/bin/python tools/make_diffusers_fixture.py
"""
import argparse
import json
import pathlib

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

# The time embedding, norms and block types that match ddpm's UNet (see src/interop.rs).
DDPM_COMPATIBLE = dict(
    act_fn="silu",
    add_attention=True,
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
)

TINY_UNET = dict(
    DDPM_COMPATIBLE,
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)

CIFAR10_UNET = dict(
    DDPM_COMPATIBLE,
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


ADM_OPTIONS = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D"),
    attention_head_dim=16,
    resnet_time_scale_shift="scale_shift",
    attn_norm_num_groups=32,  # else a scale-shift UNet's middle attention has no norm
    downsample_type="resnet",
    upsample_type="resnet",
    num_class_embeds=4,
)


def adm_imagenet(size, channels, mult, blocks):
    """ADM's class-conditional ImageNet network (attention at 32, 16 and 8 with 64-channel
    heads, scale-shift norms, residual resampling), in UNet2DModel's arguments; ddpm's
    "no class" adds a row to the 1,000 class embeddings."""
    sides = [size >> level for level in range(len(mult))]
    attends = [side in (32, 16, 8) for side in sides]
    down = ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attends]
    return dict(
        DDPM_COMPATIBLE,
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=[channels * m for m in mult],
        layers_per_block=blocks,
        down_block_types=down,
        up_block_types=[t.replace("Down", "Up") for t in reversed(down)],
        attention_head_dim=64,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=32,
        downsample_type="resnet",
        upsample_type="resnet",
        num_class_embeds=1001,
    )


ADM_PRESETS = {
    "imagenet64": adm_imagenet(64, 192, (1, 2, 3, 4), 3),
    "imagenet256": adm_imagenet(256, 256, (1, 1, 2, 2, 4, 4), 2),
}


def tiny_unet(**extra) -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, **extra})
    with torch.no_grad():
        for name, p in unet.named_parameters():
            # Default init leaves norms at (1, 0): randomise them too, so that a norm mapped
            # onto the wrong tensor changes the output.
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            # Weights exactly representable in float16, so the float16 file holds them exactly.
            p.copy_(p.half().float())
    return unet.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/diffusers")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    unet = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", variance_type="fixed_small")
    DDPMPipeline(unet=unet.half(), scheduler=scheduler).save_pretrained(out / "tiny-pipeline", safe_serialization=True)
    unet.float()

    torch.manual_seed(1)
    sample = torch.randn(3, TINY_UNET["in_channels"], 16, 16)
    timestep = torch.tensor([0, 421, 999], dtype=torch.int64)
    with torch.no_grad():
        output = unet(sample, timestep).sample
    tensors = {"sample": sample, "timestep": timestep, "output": output.contiguous()}
    for schedule in ["linear", "squaredcos_cap_v2", "sigmoid"]:
        tensors[f"betas.{schedule}"] = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule).betas.float()
    save_file(tensors, str(out / "parity.safetensors"))

    # 64 channels: GroupNorm's 32 groups of 2 channels each keep what the embedding adds (a
    # group of one channel would normalise a per-channel shift away, and the class with it).
    conditional = tiny_unet(num_class_embeds=4, block_out_channels=(64, 64))
    DDPMPipeline(unet=conditional.half(), scheduler=scheduler).save_pretrained(out / "tiny-class-pipeline", safe_serialization=True)
    conditional.float()
    class_labels = torch.tensor([0, 2, 3], dtype=torch.int64)
    with torch.no_grad():
        class_output = conditional(sample, timestep, class_labels=class_labels).sample
    save_file({"sample": sample, "timestep": timestep, "class_labels": class_labels, "output": class_output.contiguous()}, str(out / "class-parity.safetensors"))

    adm = tiny_unet(**ADM_OPTIONS)
    DDPMPipeline(unet=adm.half(), scheduler=scheduler).save_pretrained(out / "tiny-adm-pipeline", safe_serialization=True)
    adm.float()
    with torch.no_grad():
        adm_output = adm(sample, timestep, class_labels=class_labels).sample
    save_file({"sample": sample, "timestep": timestep, "class_labels": class_labels, "output": adm_output.contiguous()}, str(out / "adm-parity.safetensors"))

    presets = {}
    for name, arguments in ADM_PRESETS.items():
        with torch.device("meta"):
            network = UNet2DModel(**arguments)
        presets[name] = dict(arguments=arguments, parameters=sum(p.numel() for p in network.parameters()))
    (out / "adm_presets.json").write_text(json.dumps(presets, indent=1, sort_keys=True) + "\n")

    with torch.device("meta"):
        cifar10 = UNet2DModel(**CIFAR10_UNET)
    shapes = {name: list(t.shape) for name, t in cifar10.state_dict().items()}
    (out / "cifar10_tensor_shapes.json").write_text(json.dumps(shapes, indent=0, sort_keys=True) + "\n")
    print(f"wrote {out}: output max |y| = {output.abs().max():.4f}, {sum(p.numel() for p in unet.parameters())} tiny parameters, {len(shapes)} cifar10 tensors")


if __name__ == "__main__":
    main()
