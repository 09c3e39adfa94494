"""PCD (prune channel and distill), as DESIGN.md reconstructs it.

1. Scoring pass (``prepare``): the frozen teacher runs over ``score_batches`` batches and every
   teacher tap channel gets a discriminative score (see :mod:`pcd_core.distill.scoring`).
2. Prune: keep the top-K channels by score (K = ``keep``, default the student's width), or
   (``prune="class_balanced"``) the best-scored channels taken in turns over the classes
   they respond to most, so that no class is left without channels.
3. Match: each student channel is assigned a distinct kept channel, by maximum total cosine
   similarity of their spatial maps on the current batch (Hungarian), recomputed every
   ``rematch_every`` iterations; or by index order (``identity``). No adapter: the student's
   own channels learn. With K below the student's width (our addition; DESIGN.md has K >=
   Cs), each kept channel gets a distinct student channel instead, and the Cs - K student
   channels left over are not distilled.
4. Loss: per matched pair, spatial softmax with temperature tau and KL(teacher || student)
   times tau^2 (or, with ``feature_loss="pearson"``, 1 - the Pearson correlation of the two
   maps over spatial locations; with ``"class_profile"``, 1 - the Pearson correlation of the
   two channels' per-class mean responses over the batch), averaged over pairs and batch
   (optionally weighted by the teacher channel's normalised score), times ``weight``; plus
   logit KD (weight ``logit_kd_weight``, temperature ``logit_kd_tau``, else ``tau``). The
   loop scales both by the ``weight_schedule`` factor (constant by default), or the logit
   term by ``logit_kd_schedule`` when that is set.

With ``adapter`` (our addition, not in DESIGN.md), steps 3-4 change: a 1x1 conv maps the
student's Cs channels to the K kept channels and the loss pairs adapter output k with kept
channel k. The student then only has to make the kept teacher maps linearly recoverable from
its features, instead of turning each of its own channels into a copy of one teacher
channel; there is nothing to match, and K is free (up to Ct). The adapter is a parameter of
this module: the loop optimises it with the student, and export never sees it.

Spatial sizes: the student feature is bilinearly resized to the TEACHER's size, whichever is
larger; the teacher is the target and stays untouched (and detached).

State for an exact resume (``state_dict`` buffers): ``scores`` (Ct,), ``kept`` (K,),
``assignment`` (P,) the teacher channel of each pair, ``student_index`` (P,) the student
channel of each pair (only when K < Cs: otherwise pair i is student channel i, and a
checkpoint from before K < Cs existed loads unchanged), ``prepared`` and
``match_iteration`` (these two have Python mirrors, which avoid a device sync every step).
P, the number of pairs, is min(Cs, K), or K with the adapter.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from pcd_core.distill.base import DistillMethod, register_method
from pcd_core.distill.losses import (
    class_profile_gap,
    kd_loss,
    resize_to,
    spatial_kl,
    spatial_pearson_gap,
)
from pcd_core.distill.matching import hungarian, map_similarity
from pcd_core.distill.scoring import (
    ChannelClassStats,
    channel_scores,
    class_balanced_top_k,
    preferred_class,
)
from pcd_core.spec import MethodSpec


@register_method("pcd")
class PCD(DistillMethod):
    """Prune teacher channels by discriminative score, match them to student channels, distil.

    ``rematched`` (bool) and ``info`` (dict) tell, after each ``forward``, whether the matching
    was recomputed in that call and how long it took, so the loop and the bench can log it.
    """

    scores: Tensor
    kept: Tensor
    assignment: Tensor
    prepared: Tensor
    match_iteration: Tensor

    def __init__(
        self,
        spec: MethodSpec,
        *,
        teacher_channels: int,
        student_channels: int,
        num_classes: int,
        ignore_index: int,
        seed: int = 0,
    ) -> None:
        super().__init__(
            spec,
            teacher_channels=teacher_channels,
            student_channels=student_channels,
            num_classes=num_classes,
            ignore_index=ignore_index,
        )
        k = spec.keep if spec.keep is not None else student_channels
        if k > teacher_channels:
            raise ValueError(
                f"PCD keep={k} > teacher channels {teacher_channels} at tap {spec.tap!r}; "
                f"cannot keep more channels than the teacher has"
            )
        self.keep = k
        self.seed = seed  # for score="random"
        self.adapter: nn.Conv2d | None = None
        if spec.adapter:
            self.adapter = nn.Conv2d(student_channels, k, kernel_size=1)
        self.register_buffer("scores", torch.zeros(teacher_channels))  # (Ct,) float32
        self.register_buffer("kept", torch.arange(k))  # (K,) teacher channels, score-descending
        # (P,) the teacher channel of each pair; with the adapter (K,), always ``kept``
        partial = k < student_channels and not spec.adapter
        self.register_buffer("assignment",
                             torch.arange(k if spec.adapter else min(k, student_channels)))
        # (P,) the student channel of each pair, when K < Cs leaves some student channels out
        self.student_index: Tensor | None
        self.register_buffer("student_index", torch.arange(k) if partial else None)
        self.register_buffer("prepared", torch.zeros((), dtype=torch.bool))
        self.register_buffer("match_iteration", torch.full((), -1, dtype=torch.long))
        self._prepared = False
        self._match_iter: int | None = None  # None: never matched, so the next forward matches
        self.rematched = False
        self.info: dict[str, Any] = {"rematched": False}
        self.register_load_state_dict_post_hook(PCD._sync_mirrors)

    @staticmethod
    def _sync_mirrors(module: nn.Module, incompatible_keys: Any) -> None:
        """After ``load_state_dict``: refresh the Python copies of the scalar buffers."""
        assert isinstance(module, PCD)
        module._prepared = bool(module.prepared)
        it = int(module.match_iteration)
        module._match_iter = None if it < 0 else it

    # -- scoring and pruning ---------------------------------------------------------------

    def prepare(
        self,
        teacher: nn.Module,
        batches: Iterable[tuple[Tensor, Tensor]],
        device: torch.device | str,
        *,
        force: bool = False,
    ) -> dict[str, Any]:
        """Score the teacher's tap channels over ``score_batches`` batches and prune.

        The teacher runs in eval mode under ``no_grad`` and its training flag is restored
        afterwards: it is never mutated. When the state was already restored from a
        checkpoint (``prepared``), this is skipped unless ``force``, so a resume keeps the
        exact scores, kept channels and matching of the run it continues.
        """
        if self._prepared and not force:
            return {"skipped": True, "kept": self.keep}
        t0 = time.perf_counter()
        stats = ChannelClassStats(
            self.teacher_channels, self.num_classes, self.ignore_index, torch.device(device)
        )
        n_batches = 0
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                for img, label in batches:
                    if n_batches >= self.spec.score_batches:
                        break
                    out = teacher(img.to(device, non_blocking=True))
                    stats.update(out[self.tap_key], label.to(device, non_blocking=True))
                    n_batches += 1
        finally:
            teacher.train(was_training)
        if n_batches == 0:
            raise ValueError("PCD scoring pass got no batches (is the training set empty?)")
        stats.all_reduce()
        scores = channel_scores(stats, self.spec.score, seed=self.seed)
        self.set_scores(scores, preferred_class(stats))
        kept_scores = scores[self.kept.cpu()]
        return {
            "score": self.spec.score,
            "batches": n_batches,
            "pixels": int(stats.counts.sum()),
            "classes_present": int(stats.present().sum()),
            "teacher_channels": self.teacher_channels,
            "kept": self.keep,
            "score_max": float(scores.max()),
            "score_min": float(scores.min()),
            "kept_score_mean": float(kept_scores.mean()),
            "seconds": time.perf_counter() - t0,
        }

    @torch.no_grad()
    def set_scores(self, scores: Tensor, classes: Tensor | None = None) -> None:
        """Install channel scores (Ct,), prune to K channels and reset the matching.

        ``classes`` (Ct,) is each channel's preferred class, needed by
        ``prune="class_balanced"`` (ignored by ``top_k``). ``prepare`` calls this; tests and
        the bench may call it directly with known scores. Ties are broken by channel index
        (stable sort), so pruning is deterministic.
        """
        if scores.shape != (self.teacher_channels,):
            raise ValueError(
                f"scores must have shape ({self.teacher_channels},), got {tuple(scores.shape)}"
            )
        self.scores.copy_(scores)
        cpu_scores = scores.detach().cpu().double()
        if self.spec.prune == "class_balanced":
            if classes is None or classes.shape != (self.teacher_channels,):
                raise ValueError("prune='class_balanced' needs each channel's class (Ct,)")
            kept = class_balanced_top_k(cpu_scores, classes.cpu(), self.keep)
        else:
            kept = torch.argsort(cpu_scores, descending=True, stable=True)[: self.keep]
        self.kept.copy_(kept)
        self.assignment.copy_(self.kept[: self.assignment.numel()])  # identity until matched
        if self.student_index is not None:
            self.student_index.copy_(torch.arange(self.keep, device=self.student_index.device))
        self.prepared.fill_(True)
        self.match_iteration.fill_(-1)
        self._prepared, self._match_iter = True, None

    # -- matching ----------------------------------------------------------------------------

    def _should_rematch(self, iteration: int) -> bool:
        """First forward after pruning, then at every multiple of ``rematch_every`` (once)."""
        if self.spec.match == "identity" or self.adapter is not None:
            return False  # set by set_scores and never changes (the adapter needs none)
        if self._match_iter is None:
            return True
        return iteration % self.spec.rematch_every == 0 and iteration != self._match_iter

    @torch.no_grad()
    def rematch(self, student_feat: Tensor, teacher_feat: Tensor, iteration: int) -> None:
        """Hungarian matching on this batch: student (B,Cs,h,w) vs full teacher (B,Ct,h,w)."""
        t0 = time.perf_counter()
        t_kept = teacher_feat.index_select(1, self.kept)  # (B,K,h,w)
        sim = map_similarity(student_feat, t_kept)  # (Cs,K)
        rows, cols = hungarian(sim)  # (P,) student channels, (P,) indices into kept
        self.assignment.copy_(self.kept.index_select(0, cols.to(self.kept.device)))
        if self.student_index is not None:
            self.student_index.copy_(rows)
        self.match_iteration.fill_(iteration)
        self._match_iter = iteration
        matched = sim[rows.to(sim.device), cols.to(sim.device)]
        self.info = {
            "rematched": True,
            "rematch_s": time.perf_counter() - t0,
            "match_similarity": float(matched.mean()),
        }

    def loss_schedule(self, name: str) -> str:
        """The logit KD term follows ``logit_kd_schedule`` when set; the rest, the method's."""
        if name == "kd" and self.spec.logit_kd_schedule is not None:
            return self.spec.logit_kd_schedule
        return super().loss_schedule(name)

    # -- loss --------------------------------------------------------------------------------

    def pair_weights(self) -> Tensor:
        """(P,) matched teacher channels' scores divided by their mean (mean weight 1)."""
        s = self.scores.index_select(0, self.assignment).clamp_min(0)
        mean = s.mean()
        return torch.where(mean > 0, s / mean.clamp_min(1e-12), torch.ones_like(s))

    def forward(
        self,
        student_out: dict[str, Tensor],
        teacher_out: dict[str, Tensor] | None,
        target: Tensor,
        iteration: int,
    ) -> dict[str, Tensor]:
        if not self._prepared:
            raise RuntimeError("PCD.prepare() (the scoring pass) must run before training")
        t = self._teacher(teacher_out, self.tap_key)  # (B,Ct,h,w)
        s = student_out[self.tap_key]  # (B,Cs,h',w')
        if t.shape[1] != self.teacher_channels or s.shape[1] != self.student_channels:
            raise ValueError(
                f"PCD built for teacher/student channels {self.teacher_channels}/"
                f"{self.student_channels} at {self.tap_key!r}, got {t.shape[1]}/{s.shape[1]}"
            )
        if self.adapter is not None:
            s = self.adapter(s)  # (B,K,h',w'); a 1x1 conv commutes with the resize below
        s = resize_to(s, tuple(t.shape[-2:]))  # (B,Cs or K,h,w)
        self.rematched = self._should_rematch(iteration)
        if self.rematched:
            self.rematch(s.detach(), t, iteration)
        else:
            self.info = {"rematched": False}
        if self.student_index is not None:  # K < Cs: only the paired student channels
            s = s.index_select(1, self.student_index)  # (B,K,h,w)
        # Pair i: student (or adapter output) channel i, or student_index[i], is distilled
        # from teacher channel assignment[i]; with the adapter, assignment is ``kept``.
        matched = t.index_select(1, self.assignment)
        if self.spec.feature_loss == "pearson":
            per_pair = spatial_pearson_gap(s, matched)  # (B,P)
        elif self.spec.feature_loss == "class_profile":
            per_pair = class_profile_gap(s, matched, target, num_classes=self.num_classes,
                                         ignore_index=self.ignore_index)  # (P,) whole batch
        else:
            per_pair = spatial_kl(s, matched, self.spec.tau)
        if self.spec.score_weighting:
            per_pair = per_pair * self.pair_weights()
        losses = {"pcd": self.spec.weight * per_pair.mean()}
        if self.spec.logit_kd_weight > 0:
            t_logits = self._teacher(teacher_out, "out")
            kd = kd_loss(
                student_out["out"],
                t_logits,
                target,
                tau=self.spec.logit_kd_tau or self.spec.tau,
                ignore_index=self.ignore_index,
            )
            losses["kd"] = self.spec.logit_kd_weight * kd
        return losses
