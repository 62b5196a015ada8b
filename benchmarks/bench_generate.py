"""Image generation as the dataset's generate step runs it, on the real Stable Diffusion 2 (768-v) architecture.

No weights are downloaded: diffusers builds the UNet (865M parameters) and the VAE from the explicit config values
of stabilityai/stable-diffusion-2 with random weights, and the pipeline is given `prompt_embeds` (77 x 1024, as the
OpenCLIP ViT-H text encoder makes them), so neither the tokenizer nor the text encoder is needed. The arithmetic of a
step does not depend on the weights' values, so images/s is the real model's. Per batch size: 768 px, 25 DPMSolver++
steps, guidance 9 (two UNet passes per step), fp16 with the SD2 attention upcast, VAE decode and PIL conversion
included, as `dataset.generate` runs it. The 1st place reported about 2 s per image per GPU.

On a machine without CUDA (or with --tiny) a tiny configuration of the same blocks runs on the CPU: a smoke test of
this script, not a figure to compare.

Last line: `device=... images_per_s_per_gpu=... s_per_image=... best_batch=... gpu_days_10m=...`.
Usage: python benchmarks/bench_generate.py [--batch-sizes 1,4,8] [--steps 25] [--repeats 2] [--tiny]
"""

from __future__ import annotations

import argparse
import time

import torch

SD2_UNET = {"sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": (5, 10, 20, 20),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 1024, "use_linear_projection": True, "norm_num_groups": 32, "norm_eps": 1e-5,
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1}
SD2_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
           "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
           "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "sample_size": 768,
           "scaling_factor": 0.18215}
SD2_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "steps_offset": 1,
                 "algorithm_type": "dpmsolver++", "solver_order": 2}
TINY_UNET = {**SD2_UNET, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (8, 16),
             "attention_head_dim": 2, "norm_num_groups": 4, "cross_attention_dim": 16,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
TINY_VAE = {**SD2_VAE, "block_out_channels": (8,), "down_block_types": ("DownEncoderBlock2D",),
            "up_block_types": ("UpDecoderBlock2D",), "norm_num_groups": 4, "layers_per_block": 1, "sample_size": 8}
FIRST_PLACE_S_PER_IMAGE = 2.0
TEXT_TOKENS = 77


def build_pipeline(tiny: bool, device: torch.device):
    """A StableDiffusionPipeline of the SD2 768-v architecture (or its tiny twin) with random weights, no text
    encoder; fp16 with the attention upcast on CUDA, as `dataset.generate.load_pipeline` loads the real one."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    fp16 = device.type == "cuda"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD2_UNET), upcast_attention=fp16)
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD2_VAE))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler(**SD2_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, torch.float16 if fp16 else torch.float32)


def time_batch(pipe, batch: int, steps: int, size: int, repeats: int) -> float:
    """Seconds per image at this batch size (the best of `repeats` timed calls, after one warm-up call)."""
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    width = unet.config.cross_attention_dim
    prompt = torch.randn(batch, TEXT_TOKENS, width, device=device, dtype=dtype)
    negative = torch.zeros_like(prompt)

    def run() -> float:
        started = time.perf_counter()
        pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=steps, guidance_scale=9.0,
             height=size, width=size, generator=torch.Generator("cpu").manual_seed(0), output_type="pil")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) / batch

    run()
    return min(run() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration (the default without CUDA)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = torch.device("cuda" if cuda and not args.tiny else "cpu")
    pipe = build_pipeline(tiny, device)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{'tiny SD2-shaped' if tiny else 'SD2 768-v'} pipeline on {name}: {size} px, {args.steps} steps, "
          f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M UNet parameters", flush=True)
    rows = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        try:
            rows[batch] = time_batch(pipe, batch, args.steps, size, args.repeats)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch}: out of memory")
            torch.cuda.empty_cache()
            continue
        print(f"batch {batch}: {rows[batch]:.3f} s per image, {1 / rows[batch]:.2f} images/s "
              f"(1st place: ~{FIRST_PLACE_S_PER_IMAGE:.0f} s per image per GPU)", flush=True)
    best = min(rows, key=rows.get)
    days = 10_000_000 * rows[best] / 86_400
    if not tiny:  # the tiny configuration's rate says nothing about the real model
        print(f"10M images at batch {best}: {days:.0f} GPU-days ({days / 64:.1f} days on 64 GPUs)")
    print(f"device={name.replace(' ', '_')} images_per_s_per_gpu={1 / rows[best]:.4g} s_per_image={rows[best]:.4g} "
          f"best_batch={best} gpu_days_10m={days:.4g}" + (" tiny=1" if tiny else ""))


if __name__ == "__main__":
    main()
