"""Backbone + plugin -> logits, slice weights and view weights.

The frozen backbone runs once per slice per stream (input x view) with that stream's LoRA
adapter active; each stream's task query pools its slice embeddings into a stream embedding;
a fusion query pools the stream embeddings; dropout + linear gives the logits.

``embed_slices`` / ``trunk`` are the only code that runs a 2D backbone on slices (in chunks, with
the stream's adapter active, under the autocast and memory-format policy that
:mod:`anymc3d.runtime.device` sets on the model). Everything that needs slice embeddings, trunk
activations or logits (training, evaluation, prediction, predict-all, heatmaps, the baselines)
reaches them through :mod:`anymc3d.runtime`, which calls these two methods.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..backbones import Backbone
from .embed_norm import EmbedNorm
from .lora import activate, add_adapter, adapter_parameters
from .mixup import Mix
from .pooling import TaskQueryPool
from .spec import PluginSpec


@dataclass
class ModelOutput:
    logits: torch.Tensor                                   # (B, n_outputs)
    slice_weights: dict[str, torch.Tensor]                 # stream -> (B, S)
    view_weights: torch.Tensor                             # (B, V)
    patches: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> (B, S, h, w, D) when asked
    member_logits: list[torch.Tensor] = field(default_factory=list)  # an ensemble's members' own logits (training)


def average_outputs(outs: list[ModelOutput], task_type: str) -> ModelOutput:
    """One output from several over the same batch (ensemble members, test-time flips): the mean of
    their probabilities, as logits (log of the mean for a softmax, logit of the mean for sigmoids), so
    that ``probabilities(logits)`` is that mean; slice and view weights averaged; patches of the first."""
    logits = torch.stack([o.logits.float() for o in outs])
    log_k = math.log(len(outs))
    if task_type == "multiclass":  # log of the mean softmax, in log space (exact for saturated members too)
        combined = torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - log_k
    else:  # logit of the mean sigmoid: log mean(p) - log mean(1 - p), log p = -softplus(-z)
        pos = torch.logsumexp(-nn.functional.softplus(-logits), dim=0) - log_k
        neg = torch.logsumexp(-nn.functional.softplus(logits), dim=0) - log_k
        combined = pos - neg
    sw = {s: torch.stack([o.slice_weights[s].float() for o in outs]).mean(dim=0) for s in outs[0].slice_weights}
    vw = torch.stack([o.view_weights.float() for o in outs]).mean(dim=0)
    return ModelOutput(combined, sw, vw, outs[0].patches)


def adapter_name(prefix: str, stream: str) -> str:
    return (prefix + stream).replace(":", "_").replace(".", "_").replace("-", "_")


class AnyMC3D(nn.Module):
    """One plugin on a (shared) frozen backbone. ``adapter_prefix`` keeps several plugins apart.

    With ``spec.ensemble = K > 1`` the plugin holds K members on the same backbone (and trunk): this
    module is member 0, ``members`` the other K - 1, each with its own LoRA adapters, queries,
    normalisation and head (tensors ``m{i}.*`` in the plugin file). The output is the mean of the
    members' probabilities; ``member_logits`` carries each member's own for training."""

    def __init__(self, backbone: Backbone, spec: PluginSpec, adapter_prefix: str = "p0_",
                 chunk: int = 256, autocast: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.streams = spec.streams
        self.chunk = chunk
        self.autocast = autocast
        self.channels_last = False  # set by the runtime for CNN backbones (measured faster on CPU and GPU)
        d = backbone.embed_dim
        self.adapters: dict[str, str] = {}
        if spec.lora.r > 0:
            targets = backbone.lora_targets(spec.lora.last_k)
            for s in self.streams:
                name = adapter_name(adapter_prefix, s)
                add_adapter(backbone.model, name, targets, spec.lora)
                self.adapters[s] = name
        self.slice_pool = nn.ModuleDict({s.replace(":", "__"): TaskQueryPool(d) for s in self.streams})
        self.view_pool = TaskQueryPool(d)
        # fitted statistics (buffers, saved with the plugin), not trained parameters
        self.embed_norm = nn.ModuleDict({s.replace(":", "__"): EmbedNorm(d) for s in self.streams}
                                        if spec.embed_norm == "center_scale" else {})
        self.head = nn.Sequential(nn.Dropout(spec.head_dropout), nn.Linear(d, spec.n_outputs))
        self.trunk_engine = None  # the runtime's engine chooser for the frozen trunk (see trunk())
        self.slice_engine = None  # the runtime's chooser for the merged slice network (prediction; embed_slices())
        one = replace(spec, ensemble=1) if spec.ensemble > 1 else None
        self.members = nn.ModuleList([AnyMC3D(backbone, one, adapter_prefix=f"{adapter_prefix}m{i}_", chunk=chunk,
                                              autocast=autocast) for i in range(1, spec.ensemble)])
        self._mix: Mix | None = None  # set by mixing() during a training step only

    def _member_items(self, fn: str) -> dict:
        """``fn``'s dict of every other member, keys prefixed ``m{i}.``."""
        return {f"m{i}.{k}": v for i, m in enumerate(self.members, 1) for k, v in getattr(m, fn)().items()}

    # ---- parameters -------------------------------------------------------------------------
    def lora_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for s, name in self.adapters.items():
            for k, p in adapter_parameters(self.backbone.model, name).items():
                out[f"lora.{s}.{k}"] = p
        return {**out, **self._member_items("lora_parameters")}

    def head_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for s in self.streams:
            out[f"query.{s}"] = self.slice_pool[s.replace(":", "__")].query
        out["query.fusion"] = self.view_pool.query
        for k, p in self.head.named_parameters():
            out[f"head.{k}"] = p
        return {**out, **self._member_items("head_parameters")}

    def norm_buffers(self) -> dict[str, torch.Tensor]:
        """The embedding normalisation's fitted statistics per stream (empty without ``embed_norm``)."""
        out = {}
        for s in self.streams:
            key = s.replace(":", "__")
            if key in self.embed_norm:
                out[f"norm.{s}.mean"] = self.embed_norm[key].mean
                out[f"norm.{s}.scale"] = self.embed_norm[key].scale
        return {**out, **self._member_items("norm_buffers")}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything a plugin file stores: LoRA A/B per stream, queries, head, and the embedding
        normalisation's statistics (on the CPU: device-independent)."""
        own = {**self.lora_parameters(), **self.head_parameters(), **self.norm_buffers()}
        return {k: p.detach().to("cpu", copy=True) for k, p in own.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {**self.lora_parameters(), **self.head_parameters(), **self.norm_buffers()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"plugin tensors do not match the spec (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for k, p in own.items():
                if p.shape != state[k].shape:
                    raise KeyError(f"plugin tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[k])

    def n_trainable(self) -> int:
        return int(sum(p.numel() for p in {**self.lora_parameters(), **self.head_parameters()}.values()))

    def set_trainable(self, flag: bool = True) -> None:
        for p in {**self.lora_parameters(), **self.head_parameters()}.values():
            p.requires_grad_(flag)

    @contextmanager
    def fitting_embed_norm(self):
        """Within: every forward accumulates the raw slice embeddings (normalisation = identity);
        on leaving, the statistics are set from them (anymc3d.plugins.embed_norm)."""
        norms = list(self.embed_norm.values()) + [n for m in self.members for n in m.embed_norm.values()]
        for n in norms:
            n.start_fit()
        try:
            yield
        except BaseException:
            for n in norms:
                n.cancel_fit()
            raise
        for n in norms:
            n.finish_fit()

    @contextmanager
    def mixing(self, mix: Mix | None):
        """Within: every forward blends its cases' slice embeddings as ``mix`` says (every member alike;
        anymc3d.plugins.mixup), before pooling. ``None``: a no-op."""
        mods = [self, *self.members]
        for m in mods:
            m._mix = mix
        try:
            yield
        finally:
            for m in mods:
                m._mix = None

    # ---- forward ----------------------------------------------------------------------------
    @property
    def last_k(self) -> int | None:
        return self.spec.lora.last_k if self.spec.lora.r > 0 else None

    def _chunks(self, x: torch.Tensor):
        """(chunk of x, autocast context) pairs: the one loop over slices that every backbone pass uses."""
        amp = self.autocast and x.device.type in ("cpu", "cuda")
        for i in range(0, x.shape[0], self.chunk):
            xi = x[i:i + self.chunk]
            if self.channels_last and xi.dim() == 4:
                xi = xi.contiguous(memory_format=torch.channels_last)
            yield xi, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)

    def _run_chunks(self, runner, x: torch.Tensor) -> torch.Tensor:
        """An engine's runner over x in chunks of ``self.chunk`` slices (it takes float32 on the CPU)."""
        return torch.cat([runner(x[i:i + self.chunk].float()) for i in range(0, x.shape[0], self.chunk)])

    @torch.no_grad()
    def trunk(self, x: torch.Tensor, engine: bool = True) -> torch.Tensor:
        """Shared-trunk activations of slices (N, C, H, W); only defined when LoRA sits in the last k blocks.
        On the CPU the inference engine of ``--engine`` runs it when the runtime has set ``trunk_engine``
        (slices -> an engine's runner or None; ``engine=False``: always torch)."""
        k = self.last_k
        if k is None:
            raise ValueError("trunk() needs a plugin with lora.last_k set")
        if engine and self.trunk_engine is not None and x.device.type == "cpu":
            runner = self.trunk_engine(x)  # set by the runtime (anymc3d.runtime.engine.Runtime); None: torch
            if runner is not None:
                return self._run_chunks(runner, x)
        out = []
        for xi, amp in self._chunks(x):
            with amp:
                out.append(self.backbone.forward_trunk(xi, k))
        return torch.cat(out)

    def embed_slices(self, stream: str, x: torch.Tensor, keep_patches: bool = False, from_trunk: bool = False,
                     use_engine: bool = True):
        """x: (N, C, H, W) slices of one stream -> (N, D) embeddings [and (N, h, w, D) patch tokens].

        With ``lora.last_k`` the frozen trunk runs without autograd and only the adapted tail is
        differentiated; ``from_trunk=True`` means x already holds trunk activations (cache).
        Without gradients, on the CPU, when the runtime has set ``slice_engine`` (prediction:
        :class:`anymc3d.runtime.merged.MergedSlices`), the stream's whole slice network with its LoRA
        merged may run on an inference engine instead (``use_engine=False``: never)."""
        if (use_engine and self.slice_engine is not None and not keep_patches and not from_trunk
                and x.device.type == "cpu" and not torch.is_grad_enabled()):
            runner = self.slice_engine(stream, x)
            if runner is not None:
                return self._run_chunks(runner, x), None
        activate(self.backbone.model, self.adapters.get(stream))
        k = self.last_k
        if from_trunk and k is None:
            raise ValueError("trunk activations given to a plugin without lora.last_k")
        cls, patches = [], []
        for xi, amp in self._chunks(x):
            with amp:
                if k is None:
                    out = self.backbone(xi)
                else:
                    h = xi if from_trunk else self.trunk(xi)
                    out = self.backbone.forward_tail(h, k)
            cls.append(out.cls.float())
            if keep_patches:
                patches.append(out.patches.float())
        return torch.cat(cls), (torch.cat(patches) if keep_patches else None)

    def _trunk_of(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C, H, W) slices -> (B, S, ...) trunk activations, as the cache stores them."""
        h = self.trunk(x.flatten(0, 1))
        return h.view(*x.shape[:2], *h.shape[1:])

    def _ensemble(self, outs: list[ModelOutput]) -> ModelOutput:
        out = average_outputs(outs, self.spec.task_type)
        out.member_logits = [o.logits for o in outs]
        return out

    def _sync_members(self) -> None:
        for m in self.members:  # the runtime sets the precision and memory format on the plugin (member 0)
            m.autocast, m.channels_last = self.autocast, self.channels_last

    def forward(self, slices: dict[str, torch.Tensor], slice_mask: dict[str, torch.Tensor] | None = None,
                present: torch.Tensor | None = None, keep_patches: bool = False, from_trunk: bool = False) -> ModelOutput:
        """slices: stream -> (B, S, C, H, W) (or trunk activations with ``from_trunk``);
        slice_mask: stream -> (B, S) bool; present: (B, V) bool."""
        if len(self.members) and not from_trunk and self.last_k is not None:  # the frozen trunk once for all members
            slices = {s: self._trunk_of(x) for s, x in slices.items() if s in self.streams}
            from_trunk = True
        out = self._forward_one(slices, slice_mask, present, keep_patches, from_trunk)
        if not len(self.members):
            return out
        self._sync_members()
        return self._ensemble([out] + [m._forward_one(slices, slice_mask, present, False, from_trunk)
                                       for m in self.members])

    def _forward_one(self, slices: dict[str, torch.Tensor], slice_mask: dict[str, torch.Tensor] | None,
                     present: torch.Tensor | None, keep_patches: bool, from_trunk: bool) -> ModelOutput:
        embeddings, patches = {}, {}
        for s in self.streams:
            if s not in slices:
                continue
            x = slices[s]
            b, n = x.shape[:2]
            real = slice_mask.get(s) if slice_mask else None
            if real is None or bool(real.all()):
                emb, pt = self.embed_slices(s, x.flatten(0, 1), keep_patches, from_trunk)
                embeddings[s] = emb.view(b, n, -1)
                if keep_patches:
                    patches[s] = pt.view(b, n, *pt.shape[1:])
                continue
            # padding slices (shorter stacks in the batch) never reach the backbone: their rows stay 0
            flat = real.to(x.device).reshape(-1)
            emb, pt = self.embed_slices(s, x.flatten(0, 1)[flat], keep_patches, from_trunk)
            full = emb.new_zeros(b * n, emb.shape[-1])
            full[flat] = emb
            embeddings[s] = full.view(b, n, -1)
            if keep_patches:
                fp = pt.new_zeros(b * n, *pt.shape[1:])
                fp[flat] = pt
                patches[s] = fp.view(b, n, *pt.shape[1:])
        if self._mix is not None:
            embeddings, slice_mask, present = self._mix.embeddings(embeddings, slice_mask, present)
        out = self._pool_one(embeddings, slice_mask, present)
        out.patches = patches
        return out

    def pool_and_classify(self, embeddings: dict[str, torch.Tensor], slice_mask: dict[str, torch.Tensor] | None = None,
                          present: torch.Tensor | None = None) -> ModelOutput:
        """Everything after the backbone: slice embeddings (B, S, D) per stream -> task-query pooling,
        view fusion (missing streams masked out) and head. Also used on cached embeddings (a plugin
        without LoRA: every ensemble member pools the same embeddings)."""
        if self._mix is not None:  # every member pools the same mixed embeddings
            embeddings, slice_mask, present = self._mix.embeddings(embeddings, slice_mask, present)
        out = self._pool_one(embeddings, slice_mask, present)
        if not len(self.members):
            return out
        return self._ensemble([out] + [m._pool_one(embeddings, slice_mask, present) for m in self.members])

    def _pool_one(self, embeddings: dict[str, torch.Tensor], slice_mask: dict[str, torch.Tensor] | None,
                  present: torch.Tensor | None) -> ModelOutput:
        pooled, sw = [], {}
        ref = next(iter(embeddings.values()))
        batch, dev = ref.shape[0], ref.device
        for s in self.streams:
            if s not in embeddings:
                pooled.append(torch.zeros(batch, self.backbone.embed_dim, device=dev))
                sw[s] = torch.zeros(batch, 0, device=dev)
                continue
            mask = slice_mask.get(s) if slice_mask else None
            key = s.replace(":", "__")
            h = embeddings[s].float()
            if key in self.embed_norm:
                h = self.embed_norm[key](h, mask)
            v, w = self.slice_pool[key](h, mask)
            pooled.append(v)
            sw[s] = w
        views = torch.stack(pooled, dim=1)  # (B, V, D)
        if present is None:
            present = torch.tensor([[s in embeddings for s in self.streams]] * batch, device=dev)
        present = present.to(dev)
        if not bool(present.any(dim=1).all()):
            raise ValueError("every case needs at least one of the plugin's inputs")
        if len(self.streams) == 1:
            fused, vw = views[:, 0], torch.ones(batch, 1, device=dev)
        else:
            fused, vw = self.view_pool(views, present)
        return ModelOutput(self.head(fused), sw, vw)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.spec.task_type == "multiclass":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)
