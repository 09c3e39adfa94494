"""The baselines PCD is compared with, sharing its loop: none (CE only), kd and cwd."""

from __future__ import annotations

from torch import Tensor, nn

from pcd_core.distill.base import DistillMethod, register_method
from pcd_core.distill.losses import kd_loss, resize_to, spatial_kl
from pcd_core.spec import MethodSpec


@register_method("none")
class NoDistill(DistillMethod):
    """Plain training: the loop's cross-entropy is the whole loss."""

    needs_teacher = False

    def forward(
        self,
        student_out: dict[str, Tensor],
        teacher_out: dict[str, Tensor] | None,
        target: Tensor,
        iteration: int,
    ) -> dict[str, Tensor]:
        return {}


@register_method("kd")
class LogitKD(DistillMethod):
    """Pixel-wise logit KD: ``{"kd": weight * KD(out)}`` (see :func:`kd_loss`)."""

    def forward(
        self,
        student_out: dict[str, Tensor],
        teacher_out: dict[str, Tensor] | None,
        target: Tensor,
        iteration: int,
    ) -> dict[str, Tensor]:
        t = self._teacher(teacher_out, "out")  # (B,K,H,W)
        loss = kd_loss(
            student_out["out"], t, target, tau=self.spec.tau, ignore_index=self.ignore_index
        )
        return {"kd": self.spec.weight * loss}


@register_method("cwd")
class ChannelWiseDistill(DistillMethod):
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Each channel map becomes a spatial distribution softmax(x/tau); the loss is
    KL(teacher || student) summed over locations, times tau^2, averaged over channels and
    batch. ``cwd_on="logits"`` distils the class score maps (no parameters);
    ``cwd_on="features"`` distils the ``tap_key`` features through a 1x1 conv adapter that
    maps the student's channels to the teacher's. The adapter is a parameter of this module,
    so the loop optimises it with the student (and it is discarded at export).
    """

    def __init__(
        self,
        spec: MethodSpec,
        *,
        teacher_channels: int,
        student_channels: int,
        num_classes: int,
        ignore_index: int,
    ) -> None:
        super().__init__(
            spec,
            teacher_channels=teacher_channels,
            student_channels=student_channels,
            num_classes=num_classes,
            ignore_index=ignore_index,
        )
        self.adapter: nn.Conv2d | None = None
        if spec.cwd_on == "features":
            self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(
        self,
        student_out: dict[str, Tensor],
        teacher_out: dict[str, Tensor] | None,
        target: Tensor,
        iteration: int,
    ) -> dict[str, Tensor]:
        if self.adapter is None:
            t = self._teacher(teacher_out, "out")  # (B,K,H,W)
            s = student_out["out"]
        else:
            t = self._teacher(teacher_out, self.tap_key)  # (B,Ct,h,w)
            s = self.adapter(student_out[self.tap_key])  # (B,Cs,h',w') -> (B,Ct,h',w')
        s = resize_to(s, tuple(t.shape[-2:]))
        loss = spatial_kl(s, t, self.spec.tau).mean()
        return {"cwd": self.spec.weight * loss}
