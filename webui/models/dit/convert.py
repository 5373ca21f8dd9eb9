"""Original single-file DiT layouts <-> diffusers transformer keys, from one declarative table per family.

* Flux.1 (BFL layout, also Kontext / schnell / Fill): ``double_blocks.N.*``, ``single_blocks.N.*``, ``img_in``, ...
* Chroma (BFL layout, Flux without modulation weights): the Flux table plus ``distilled_guidance_layer.*``
* SD3 / SD3.5 (MMDiT, Stability layout): ``joint_blocks.N.{x_block,context_block}.*``, ``x_embedder``, ...

Each ``Rule`` maps one original module to one or more diffusers modules: ``copy`` (a rename), ``split`` (a
fused qkv cut in equal parts along dim 0), ``split_mlp`` (Flux ``single_blocks.N.linear1``: q, k, v of the
model width then the MLP rest -- the width comes from the weight itself, never a hard-coded 3072) and ``swap``
(adaLN ``shift, scale`` -> diffusers ``scale, shift``).  ``to_diffusers`` applies the table, ``from_diffusers``
its exact inverse (used to write real-layout fixture files); every source tensor must be used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
import torch

StateDict = dict[str, torch.Tensor]
PARAMS = (("weight", "weight"), ("bias", "bias"))
NORM_PARAMS = (("scale", "weight"),)


class ConversionError(ValueError):
    """The weights do not have the layout the table expects; the message names the keys."""


@dataclass(frozen=True)
class Rule:
    src: str  # original module name
    dst: tuple[str, ...]  # diffusers module name(s)
    op: str = "copy"  # copy | split | split_mlp | swap
    params: tuple[tuple[str, str], ...] = PARAMS  # (original suffix, diffusers suffix)


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def count_blocks(keys, prefix: str) -> int:
    """Number of ``prefix.N.`` blocks (highest index + 1); 0 when there are none."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


# ---------------------------------------------------------------------------------------------- Flux
def flux_rules(num_double: int, num_single: int) -> list[Rule]:
    rules = [
        Rule("img_in", ("x_embedder",)), Rule("txt_in", ("context_embedder",)),
        Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
        Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    ]
    for i in range(num_double):
        s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rules += [
            Rule(s + "img_mod.lin", (d + "norm1.linear",)), Rule(s + "txt_mod.lin", (d + "norm1_context.linear",)),
            Rule(s + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), "split"),
            Rule(s + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"), "split"),
            Rule(s + "img_attn.norm.query_norm", (d + "attn.norm_q",), params=NORM_PARAMS),
            Rule(s + "img_attn.norm.key_norm", (d + "attn.norm_k",), params=NORM_PARAMS),
            Rule(s + "txt_attn.norm.query_norm", (d + "attn.norm_added_q",), params=NORM_PARAMS),
            Rule(s + "txt_attn.norm.key_norm", (d + "attn.norm_added_k",), params=NORM_PARAMS),
            Rule(s + "img_attn.proj", (d + "attn.to_out.0",)), Rule(s + "txt_attn.proj", (d + "attn.to_add_out",)),
            Rule(s + "img_mlp.0", (d + "ff.net.0.proj",)), Rule(s + "img_mlp.2", (d + "ff.net.2",)),
            Rule(s + "txt_mlp.0", (d + "ff_context.net.0.proj",)), Rule(s + "txt_mlp.2", (d + "ff_context.net.2",)),
        ]
    for i in range(num_single):
        s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rules += [
            Rule(s + "modulation.lin", (d + "norm.linear",)),
            Rule(s + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"), "split_mlp"),
            Rule(s + "norm.query_norm", (d + "attn.norm_q",), params=NORM_PARAMS),
            Rule(s + "norm.key_norm", (d + "attn.norm_k",), params=NORM_PARAMS),
            Rule(s + "linear2", (d + "proj_out",)),
        ]
    return rules


# ---------------------------------------------------------------------------------------------- Chroma
# Chroma (lodestones) is Flux.1 without the per-block modulation, time / vector / guidance inputs and final adaLN:
# one "distilled guidance" approximator computes every modulation vector.  Its table is the Flux one minus those
# modules, plus the approximator.
CHROMA_DROPPED = ("time_in.", "vector_in.", "guidance_in.", "final_layer.adaLN_modulation", ".img_mod.",
                  ".txt_mod.", ".modulation.")


def chroma_rules(num_double: int, num_single: int, num_approximator: int) -> list[Rule]:
    g = "distilled_guidance_layer."
    rules = [Rule(g + "in_proj", (g + "in_proj",)), Rule(g + "out_proj", (g + "out_proj",))]
    for i in range(num_approximator):
        rules += [Rule(f"{g}layers.{i}.in_layer", (f"{g}layers.{i}.linear_1",)),
                  Rule(f"{g}layers.{i}.out_layer", (f"{g}layers.{i}.linear_2",)),
                  Rule(f"{g}norms.{i}", (f"{g}norms.{i}",), params=NORM_PARAMS)]
    return rules + [r for r in flux_rules(num_double, num_single)
                    if not any(part in r.src + "." for part in CHROMA_DROPPED)]


def chroma_to_diffusers(state: StateDict) -> StateDict:
    return to_diffusers(state, chroma_rules(count_blocks(state, "double_blocks"), count_blocks(state, "single_blocks"),
                                            count_blocks(state, "distilled_guidance_layer.layers")))


def chroma_from_diffusers(state: StateDict) -> StateDict:
    rules = chroma_rules(count_blocks(state, "transformer_blocks"), count_blocks(state, "single_transformer_blocks"),
                         count_blocks(state, "distilled_guidance_layer.layers"))
    return from_diffusers(state, rules)


# ---------------------------------------------------------------------------------------------- SD3
def sd3_rules(num_layers: int) -> list[Rule]:
    rules = [
        Rule("x_embedder.proj", ("pos_embed.proj",)),
        Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
        Rule("context_embedder", ("context_embedder",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    ]
    for i in range(num_layers):
        s, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == num_layers - 1
        rules += [
            Rule(s + "x_block.attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), "split"),
            Rule(s + "context_block.attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"),
                 "split"),
            Rule(s + "x_block.attn.ln_q", (d + "attn.norm_q",)), Rule(s + "x_block.attn.ln_k", (d + "attn.norm_k",)),
            Rule(s + "context_block.attn.ln_q", (d + "attn.norm_added_q",)),
            Rule(s + "context_block.attn.ln_k", (d + "attn.norm_added_k",)),
            Rule(s + "x_block.attn.proj", (d + "attn.to_out.0",)),
            Rule(s + "context_block.attn.proj", (d + "attn.to_add_out",)),
            Rule(s + "x_block.attn2.qkv", (d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"), "split"),
            Rule(s + "x_block.attn2.ln_q", (d + "attn2.norm_q",)), Rule(s + "x_block.attn2.ln_k", (d + "attn2.norm_k",)),
            Rule(s + "x_block.attn2.proj", (d + "attn2.to_out.0",)),
            Rule(s + "x_block.adaLN_modulation.1", (d + "norm1.linear",)),
            Rule(s + "context_block.adaLN_modulation.1", (d + "norm1_context.linear",), "swap" if last else "copy"),
            Rule(s + "x_block.mlp.fc1", (d + "ff.net.0.proj",)), Rule(s + "x_block.mlp.fc2", (d + "ff.net.2",)),
            Rule(s + "context_block.mlp.fc1", (d + "ff_context.net.0.proj",)),
            Rule(s + "context_block.mlp.fc2", (d + "ff_context.net.2",)),
        ]
    return rules


# ---------------------------------------------------------------------------------------------- engine
def _pieces(rule: Rule, tensor: torch.Tensor, width: int | None) -> list[torch.Tensor]:
    if rule.op == "copy":
        return [tensor]
    if rule.op == "swap":
        return [_swap(tensor)]
    if rule.op == "split":
        if tensor.shape[0] % len(rule.dst):
            raise ConversionError(f"{rule.src}: fused size {tensor.shape[0]} does not split in {len(rule.dst)}")
        return list(tensor.chunk(len(rule.dst), dim=0))
    if width is None or tensor.shape[0] <= 3 * width:
        raise ConversionError(f"{rule.src}: size {tensor.shape[0]} leaves no MLP part after q, k, v of width {width}")
    return list(torch.split(tensor, [width] * 3 + [tensor.shape[0] - 3 * width], dim=0))


def _join(rule: Rule, parts: list[torch.Tensor]) -> torch.Tensor:
    if rule.op == "swap":
        return _swap(parts[0])
    return parts[0] if rule.op == "copy" else torch.cat(parts, dim=0)


def to_diffusers(state: StateDict, rules: list[Rule]) -> StateDict:
    """Original-layout tensors -> diffusers transformer keys; unknown leftovers are an error."""
    out: StateDict = {}
    used: set[str] = set()
    for rule in rules:
        weight = state.get(rule.src + ".weight")
        shape = tuple(getattr(weight, "quant_shape", getattr(weight, "shape", ())))  # GGUF: logical shape
        width = int(shape[1]) if rule.op == "split_mlp" and len(shape) == 2 else None
        for src_suffix, dst_suffix in rule.params:
            key = f"{rule.src}.{src_suffix}"
            if key not in state:
                continue
            used.add(key)
            for name, piece in zip(rule.dst, _pieces(rule, state[key], width)):
                out[f"{name}.{dst_suffix}"] = piece.contiguous()
    _check_used(state, used)
    return out


def from_diffusers(state: StateDict, rules: list[Rule]) -> StateDict:
    """The exact inverse of ``to_diffusers`` (writes original-layout files)."""
    out: StateDict = {}
    used: set[str] = set()
    for rule in rules:
        for src_suffix, dst_suffix in rule.params:
            keys = [f"{name}.{dst_suffix}" for name in rule.dst]
            if not all(k in state for k in keys):
                continue
            used.update(keys)
            out[f"{rule.src}.{src_suffix}"] = _join(rule, [state[k] for k in keys]).contiguous()
    _check_used(state, used)
    return out


def _check_used(state: StateDict, used: set[str]) -> None:
    left = sorted(k for k in state if k not in used)
    if left:
        raise ConversionError(f"{len(left)} tensors have no place in the model (e.g. {', '.join(left[:4])})")


def flux_to_diffusers(state: StateDict) -> StateDict:
    return to_diffusers(state, flux_rules(count_blocks(state, "double_blocks"), count_blocks(state, "single_blocks")))


def flux_from_diffusers(state: StateDict) -> StateDict:
    rules = flux_rules(count_blocks(state, "transformer_blocks"), count_blocks(state, "single_transformer_blocks"))
    return from_diffusers(state, rules)


def sd3_to_diffusers(state: StateDict) -> StateDict:
    rest = dict(state)
    pos = rest.pop("pos_embed", None)  # a bare tensor, not a module: moved by hand
    out = to_diffusers(rest, sd3_rules(count_blocks(state, "joint_blocks")))
    if pos is not None:
        out["pos_embed.pos_embed"] = pos
    return out


def sd3_from_diffusers(state: StateDict) -> StateDict:
    rest = dict(state)
    pos = rest.pop("pos_embed.pos_embed", None)
    out = from_diffusers(rest, sd3_rules(count_blocks(state, "transformer_blocks")))
    if pos is not None:
        out["pos_embed"] = pos
    return out
