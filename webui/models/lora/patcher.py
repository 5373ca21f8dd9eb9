"""Merge a LoRA stack into a model's weights and restore them bit-exactly.  Worker thread only.

How weights are written
-----------------------
For every parameter a stack touches, the pristine tensor is saved once, as a real CPU copy, before the
first write.  The merged weight ``pristine + sum(multiplier_i * delta_i)`` is computed in float32 on the
parameter's device, cast to the parameter's dtype, and **assigned** as the parameter's new tensor
(``param.data = merged``): the tensor the parameter held before is never written to.  That tensor may be
shared with something else (a state dict the component cache keeps to rebuild the model, a memory-mapped
file), so writing into it in place could corrupt data we do not own.  The ``nn.Parameter`` object itself
stays the same, so modules and hooks keep their references (and a pipeline made with ``from_pipe``, which
shares the modules, sees the same patched weights).

GGUF-quantized layers cannot be merged into: while patched they hold a dense merged weight and get their
quantized parameter object back on restore (``webui.models.lora.quantized``).

Restoring assigns the saved pristine copy back (moved to the parameter's device) and forgets it; it never
subtracts deltas, so restore is exact no matter how many swaps came before (``torch.equal`` holds).
Backups exist only for currently patched parameters, which bounds the extra memory to those.

Swaps
-----
Each patched parameter remembers the exact list of contributions merged into it (which LoRA object,
which layer, which multiplier).  ``apply`` computes the wanted lists for the new stack, rewrites only the
parameters whose list changed, restores parameters the new stack no longer touches and leaves the rest
alone.  Applying the same stack again does nothing.  If anything fails midway, every parameter is
restored to pristine before the exception propagates.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from webui.models.lora import quantized
from webui.models.lora.blocks import block_multiplier, resolve_block_weights
from webui.models.lora.compat import MatchReport, check_lora, model_arch
from webui.models.lora.formats import LoraPatch
from webui.models.lora.keymap import DENOISERS, KeyMap
from webui.models.lora.loading import LoadedLora
from webui.types import Arch

MATCH_CACHE_SIZE = 64  # LoRAs whose layer matching is remembered (memory stays flat however many are used)

__all__ = ["LoraPatcher", "PatchReport", "StackEntry"]

log = logging.getLogger(__name__)

ParamKey = tuple[str, str, str]  # (component, module name, "weight" | "bias")
Contribution = tuple[LoadedLora, str, float]  # (lora, layer name in the file, multiplier)


class StackEntry(NamedTuple):
    """One LoRA of a stack.  A plain ``(lora, unet_weight, te_weight)`` tuple is accepted too."""

    lora: LoadedLora
    unet_weight: float = 1.0
    te_weight: float | None = 1.0  # None: same as unet_weight
    block_weights: str | Sequence[float] | None = None  # preset name or vector (see ``blocks``)


@dataclass(frozen=True)
class PatchReport:
    identity: tuple
    layers_written: int  # parameters recomputed and written by this call
    layers_restored: int  # parameters put back to pristine by this call
    layers_patched: int  # parameters that differ from pristine after this call
    matches: tuple[MatchReport, ...]
    warnings: tuple[str, ...]
    seconds: float

    @property
    def noop(self) -> bool:
        return self.layers_written == 0 and self.layers_restored == 0


class LoraPatcher:
    """Applies LoRA stacks to ``{"unet": ..., "te1": ..., "te2": ...}`` (DiT models: ``{"transformer": ...,
    "te1": ..., "te2": ..., "te3": ...}``) by merging into the weights.

    One patcher per loaded model; the modules must be pristine when it is created.  ``arch`` is the
    model's architecture if the caller knows it (from detection); otherwise it is inferred."""

    def __init__(self, modules: Mapping[str, nn.Module], *, arch: Arch | None = None) -> None:
        self._keymap = KeyMap(modules)
        self._arch = arch if arch is not None else model_arch(self._keymap.components)
        self._pristine: dict[ParamKey, torch.Tensor] = {}
        self._applied: dict[ParamKey, tuple] = {}  # key -> signature of what is merged into it now
        self._stack: tuple[StackEntry, ...] = ()
        self._identity: tuple = ()
        # Match reports of recently used LoRAs (bounded LRU: swapping back to a stack skips re-matching).
        self._matches: OrderedDict[int, tuple[LoadedLora, MatchReport]] = OrderedDict()

    # ------------------------------------------------------------------ public
    @property
    def arch(self) -> Arch:
        return self._arch

    @property
    def keymap(self) -> KeyMap:
        return self._keymap

    @property
    def applied_identity(self) -> tuple:
        """Sorted ``((lora.sha256 or path, unet_weight, te_weight[, block weights]), ...)`` now merged."""
        return self._identity

    @property
    def patched_count(self) -> int:
        return len(self._applied)

    @property
    def backup_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._pristine.values())

    def check(self, lora: LoadedLora) -> MatchReport:
        """Match ``lora`` against this model without touching weights; raises ``LoraError`` if it cannot apply."""
        cached = self._matches.get(id(lora))
        if cached is not None and cached[0] is lora:
            self._matches.move_to_end(id(lora))
            return cached[1]
        report = check_lora(lora, self._keymap, self._arch)
        self._matches[id(lora)] = (lora, report)
        while len(self._matches) > MATCH_CACHE_SIZE:
            self._matches.popitem(last=False)
        return report

    def apply(self, stack: Sequence[StackEntry | tuple]) -> PatchReport:
        """Make the weights ``pristine + stack``.  Raises ``LoraError`` (before touching anything) for a LoRA
        that does not fit; on any other failure restores everything and re-raises."""
        started = time.perf_counter()
        entries = tuple(_entry(e) for e in stack)
        identity = _identity(entries)
        same_objects = len(entries) == len(self._stack) and all(
            a.lora is b.lora for a, b in zip(entries, self._stack))
        if identity == self._identity and same_objects:
            return self._report(identity, 0, 0, tuple(self.check(e.lora) for e in entries), started)
        matches = tuple(self.check(e.lora) for e in entries)  # raises before any write
        wanted = self._wanted(entries, matches)
        changed = [k for k, contribs in wanted.items() if self._applied.get(k) != _signature(contribs)]
        removed = [k for k in self._applied if k not in wanted]
        try:
            for key in removed:
                self._restore_one(key)
            for key in changed:
                self._write(key, wanted[key])
        except BaseException:
            self.restore()
            raise
        self._stack, self._identity = entries, identity
        warnings = tuple(w for m in matches if (w := m.warning)) + tuple(
            w for e in entries for w in e.lora.warnings) + tuple(
            f"LoRA {e.lora.label}: block weights are defined for SD/SDXL UNet blocks; the transformer layers of "
            f"this model get the plain weight" for e in entries
            if e.block_weights is not None and "transformer" in self._keymap.components)
        for w in warnings:
            log.warning(w)
        return self._report(identity, len(changed), len(removed), matches, started, warnings)

    def restore(self) -> None:
        """Put every patched parameter back to its pristine tensor (bit-exact) and forget the stack."""
        errors: list[BaseException] = []
        for key in list(self._pristine):
            try:
                self._restore_one(key)
            except BaseException as exc:  # keep restoring the others
                errors.append(exc)
        self._applied.clear()
        self._stack, self._identity = (), ()
        if errors:
            raise errors[0]

    @contextmanager
    def applied(self, stack: Sequence[StackEntry | tuple]) -> Iterator[PatchReport]:
        """``with patcher.applied(stack):`` -- patched inside, pristine after (also when the body raises)."""
        try:
            yield self.apply(stack)
        finally:
            self.restore()

    # ------------------------------------------------------------------ internals
    def _wanted(self, entries: Sequence[StackEntry], matches: Sequence[MatchReport],
                ) -> dict[ParamKey, list[Contribution]]:
        wanted: dict[ParamKey, list[Contribution]] = {}
        sdxl = self._arch in (Arch.SDXL, Arch.SDXL_REFINER)
        for entry, match in zip(entries, matches):
            blocks = resolve_block_weights(entry.block_weights, sdxl=sdxl) if entry.block_weights is not None else None
            for name, target in match.matched.items():
                base = entry.unet_weight if target.component in DENOISERS else entry.te_weight
                mult = float(base) * block_multiplier(blocks, target.block)
                if mult == 0.0:
                    continue
                wanted.setdefault((target.component, target.module, "weight"), []).append((entry.lora, name, mult))
                if entry.lora.patches[name].bias_diff is not None and self._has_bias(target):
                    wanted.setdefault((target.component, target.module, "bias"), []).append(
                        (entry.lora, name, mult))
        return wanted

    def _has_bias(self, target) -> bool:
        return getattr(self._keymap.module(target), "bias", None) is not None

    def _param(self, key: ParamKey) -> nn.Parameter:
        module = self._keymap.layers(key[0])[key[1]]
        param = getattr(module, key[2])
        if param is None:
            raise ValueError(f"{key[0]}.{key[1]} has no {key[2]} to patch")
        return param

    def _write(self, key: ParamKey, contribs: Sequence[Contribution]) -> None:
        param = self._param(key)
        if quantized.is_quantized(self._pristine.get(key, param)):  # a GGUF layer: dense while patched
            self._pristine.setdefault(key, param)  # never written to: the object itself is the backup
            quantized.merge(self._keymap.layers(key[0])[key[1]], key[2], self._pristine[key],
                            lambda orig: _sum_deltas(orig, contribs, key[2]))
            self._applied[key] = _signature(contribs)
            return
        if key not in self._pristine:
            # A real copy on the CPU: never a view of the live tensor.
            self._pristine[key] = param.detach().to("cpu", copy=True)
        with torch.no_grad():
            orig = self._pristine[key].to(param.device, torch.float32)
            merged = (orig + _sum_deltas(orig, contribs, key[2])).to(param.dtype)
        param.data = merged  # a new tensor: the previous one (maybe shared) is never written to
        self._applied[key] = _signature(contribs)

    def _restore_one(self, key: ParamKey) -> None:
        param = self._param(key)
        pristine = self._pristine.get(key)
        if pristine is not None:
            if quantized.is_quantized(pristine):  # the GGUF parameter object goes back into its layer
                quantized.restore(self._keymap.layers(key[0])[key[1]], key[2], pristine)
            else:
                param.data = pristine.to(param.device)  # on the CPU this hands over our private copy itself
            del self._pristine[key]  # only once the parameter holds it again
        self._applied.pop(key, None)

    def _report(self, identity: tuple, written: int, restored: int, matches: tuple, started: float,
                warnings: tuple[str, ...] = ()) -> PatchReport:
        return PatchReport(identity=identity, layers_written=written, layers_restored=restored,
                           layers_patched=len(self._applied), matches=matches, warnings=warnings,
                           seconds=time.perf_counter() - started)


def _sum_deltas(orig: torch.Tensor, contribs: Sequence[Contribution], which: str) -> torch.Tensor:
    """Sum of ``mult * delta`` over a layer's contributions.  Plain low-rank LoRAs are fused into one
    matmul (``[up1*s1 | up2*s2 ...] @ [down1; down2 ...]``): one kernel per layer however many LoRAs."""
    total: torch.Tensor | None = None
    ups: list[tuple[torch.Tensor, float, float]] = []
    downs: list[torch.Tensor] = []
    for lora, name, mult in contribs:
        patch = lora.patches[name]
        if which == "weight" and type(patch) is LoraPatch and patch.mid is None and patch.magnitude is None:
            ups.append((patch.up.reshape(patch.up.shape[0], -1).to(orig.device, torch.float32), patch.scale, mult))
            downs.append(patch.down.reshape(patch.down.shape[0], -1).to(orig.device, torch.float32))
            continue
        delta = patch.delta(orig) if which == "weight" else patch.bias_delta(orig)
        total = delta * mult if total is None else total.add_(delta, alpha=mult)
    if len(ups) == 1:  # the same operations, in the same order, as ``patch.delta(orig) * mult``
        up, scale, mult = ups[0]
        low = (up @ downs[0]).reshape(orig.shape) * scale * mult
    elif ups:
        low = (torch.cat([u * (sc * m) for u, sc, m in ups], 1) @ torch.cat(downs, 0)).reshape(orig.shape)
    if ups:
        total = low if total is None else total.add_(low)
    return total if total is not None else torch.zeros_like(orig)


def _entry(item: StackEntry | tuple) -> StackEntry:
    entry = StackEntry(*item)
    if entry.te_weight is None:  # LoraRef.te_weight None: same as the UNet weight
        entry = entry._replace(te_weight=entry.unet_weight)
    return entry


def _signature(contribs: Sequence[Contribution]) -> tuple:
    # The LoRA object's id is part of the signature: a re-read file is a new object (its content may have
    # changed).  Ids cannot be reused while the patcher holds the applied stack.
    return tuple((id(lora), lora.identity, name, mult) for lora, name, mult in contribs)


def _identity(entries: Sequence[StackEntry]) -> tuple:
    items = []
    for e in entries:
        item: tuple = (e.lora.identity, float(e.unet_weight), float(e.te_weight))
        if e.block_weights is not None:
            bw = e.block_weights
            item += (bw.strip().upper() if isinstance(bw, str) else tuple(float(x) for x in bw),)
        items.append(item)
    return tuple(sorted(items, key=repr))
