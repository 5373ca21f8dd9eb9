"""DiT families on the CPU: our job path vs the plain diffusers pipeline, and a GGUF (Q8_0) transformer vs the
dense one, measured in the same run.

Small random-weight models with the real *architectures* (Flux.1 dev: double + single stream blocks, distilled
guidance; SD3.5: MMDiT joint blocks with q/k RMS norms), sized so a job takes about a second on 2 CPU cores.
Ours: ``build_dit_plan`` + ``run_generation`` (prompt encoding, packed noise per seed, flow scheduler, step
callback, decode).  Plain: ``pipe(prompt=..., output_type="pil")`` with the same components, seed and steps.
A/B runs are interleaved so machine noise hits both alike; medians are compared.  GGUF: the Flux transformer
written as a city96-style GGUF (Q8_0 linear weights) and loaded by our loader; parameter bytes and job time
against the dense transformer.  The GPU tier (real sizes, every memory mode) is tests/gpu/test_dit_memory_modes.py.

    python bench/dit.py [--runs 7] [--steps 4] [--size 256]

Goals: ours / plain <= 1.05 for both families; GGUF parameter bytes < 0.5x dense.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from webui.settings import apply_offline_env  # noqa: E402

apply_offline_env()

import torch  # noqa: E402

from tests.fixtures.dit_factory import clip_tokenizer, t5_tokenizer_object, t5_vocab_size  # noqa: E402
from tests.fixtures.dit_pipes import Control, FakeModel  # noqa: E402
from webui.generation.dit import build_dit_plan  # noqa: E402
from webui.generation.runner import RunOptions, run_generation  # noqa: E402
from webui.models.cache import module_bytes  # noqa: E402
from webui.models.dit.components import DitComponents, build_dit_pipeline  # noqa: E402
from webui.types import Arch, GenerationRequest  # noqa: E402

PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk", "blurry"
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
FLUX_FLOW = {**FLOW, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096}


def _clip(width: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=width, intermediate_size=width * 4, num_hidden_layers=2,
                                                      num_attention_heads=4, projection_dim=width)).eval()


def _t5(width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=t5_vocab_size(), d_model=width, d_kv=64, d_ff=width * 2, num_layers=2,
                                   num_heads=width // 64)).eval()


def _vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                         layers_per_block=1, latent_channels=16, norm_num_groups=16, scaling_factor=scaling,
                         shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False).eval()


def flux_components(transformer=None) -> DitComponents:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    transformer = transformer or FluxTransformer2DModel(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True, axes_dims_rope=(8, 28, 28)).eval()
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4)).eval()
    return DitComponents(transformer=transformer, vae=_vae(0.3611, 0.1159), text_encoder=clip,
                         tokenizer=clip_tokenizer(), text_encoder_2=_t5(256), tokenizer_2=t5_tokenizer_object(),
                         scheduler_config=FLUX_FLOW, pipeline_class="FluxPipeline", arch=Arch.FLUX,
                         config_key="flux-dev")


def sd3_components() -> DitComponents:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=256, out_channels=16,
        pos_embed_max_size=64, qk_norm="rms_norm").eval()
    return DitComponents(transformer=transformer, vae=_vae(1.5305, 0.0609), text_encoder=_clip(128),
                         tokenizer=clip_tokenizer(), text_encoder_2=_clip(128), tokenizer_2=clip_tokenizer(),
                         text_encoder_3=_t5(256), tokenizer_3=t5_tokenizer_object(), scheduler_config=FLOW,
                         pipeline_class="StableDiffusion3Pipeline", arch=Arch.SD3, config_key="sd3")


def ours(model, *, seed: int, steps: int, size: int, outdir: Path) -> float:
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE if model.arch is Arch.SD3 else "",
                                steps=steps, cfg_scale=3.5, sampler="Euler", width=size, height=size, seed=seed,
                                save_images=False, preview_every=0)
    started = time.perf_counter()
    run_generation(model, request, Control(), RunOptions(outdir=outdir, save=False, previews=False),
                   build_dit_plan(model, request))
    return time.perf_counter() - started


def plain(pipe, arch: Arch, *, seed: int, steps: int, size: int) -> float:
    extra = {"negative_prompt": NEGATIVE} if arch is Arch.SD3 else {}
    started = time.perf_counter()
    pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=3.5, width=size, height=size,
         generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **extra)
    return time.perf_counter() - started


def compare(label: str, components: DitComponents, args, outdir: Path) -> float:
    pipe = build_dit_pipeline(components)
    model = FakeModel(pipe=pipe, arch=components.arch)
    kw = dict(steps=args.steps, size=args.size)
    ours(model, seed=0, outdir=outdir, **kw), plain(pipe, components.arch, seed=0, **kw)  # warm-up
    a, b = [], []
    for seed in range(args.runs):
        a.append(ours(model, seed=seed, outdir=outdir, **kw))
        b.append(plain(pipe, components.arch, seed=seed, **kw))
    mine, base = statistics.median(a), statistics.median(b)
    print(f"{label:<10} {args.size}x{args.size} {args.steps} steps: ours {mine * 1000:7.1f} ms, plain diffusers "
          f"{base * 1000:7.1f} ms, ratio {mine / base:.3f} ({(mine - base) * 1000:+.1f} ms/job)")
    return mine


def gguf_transformer(dense, folder: Path):
    from tests.fixtures.gguf_factory import _write
    from webui.models.dit import convert
    from webui.models.dit.loaders import load_transformer_file

    path = _write(convert.flux_from_diffusers(dense.state_dict()), folder / "flux-bench-Q8_0.gguf", "flux")
    return load_transformer_file(path, arch=Arch.FLUX, details={"format": "bfl", "prefix": ""},
                                 dtype=torch.float32)["transformer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="webui-bench-dit-") as tmp:
        out = Path(tmp)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
        flux = flux_components()
        dense_ms = compare("Flux.1", flux, args, out)
        compare("SD3.5", sd3_components(), args, out)
        quantized = gguf_transformer(flux.transformer, out)
        gguf_ms = compare("Flux GGUF", flux_components(quantized), args, out)
        dense_bytes, gguf_bytes = module_bytes(flux.transformer), module_bytes(quantized)
        print(f"GGUF Q8_0 transformer: {gguf_bytes / 2**20:.2f} MiB vs dense {dense_bytes / 2**20:.2f} MiB "
              f"({gguf_bytes / dense_bytes:.3f}x); job time {gguf_ms / dense_ms:.3f}x dense "
              "(layers dequantized in every forward)")


if __name__ == "__main__":
    main()
