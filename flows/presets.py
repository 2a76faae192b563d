"""Named training presets.

``paper-*`` reproduce the papers' settings and need a GPU; ``cpu-*`` are small enough to
train in minutes on a 2-core CPU machine (tests, the demo, CI).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from flows.glow import GlowConfig
from flows.preprocess import Preprocessing

BCT_WINDOW = (-14.0, 114.0)  # clip(HU + 14, 0, 127) at 7 bits (Shibata et al.)
CHESTCT_WINDOW = (-1020.0, 200.0)  # CT-3DFlow


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    glow: GlowConfig
    preprocessing: Preprocessing
    batch_size: int
    lr: float
    epochs: int
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 50.0
    # Fine-tuning M0 from M1 (see docs/decisions.md): epochs on the normal set.
    finetune_epochs: int = 0
    # Floors on the optimisation steps of a model trained from scratch / fine-tuned, used when
    # the epochs are the preset's own: a data set smaller than the one the preset was measured
    # on gets more epochs instead of proportionally less training (flows.train.TrainOptions).
    min_steps: int = 0
    finetune_min_steps: int = 0
    finetune_lr: float = 0.0
    finetune_freeze: int = 0  # finest levels M0 and M1 keep shared while fine-tuning
    strategy: str = "independent"  # how a bundle's two models are trained (flows.build)
    ema_decay: float = 0.0  # weight averaging while training (flows.train.TrainOptions.ema_decay)
    # CT patch models: > 0 sets the preprocessing's noise floor from the training volumes
    # (this percentile of their noise, flows.patchbundle.choose_noise_floor)
    noise_floor_percentile: float = 0.0
    # whole-image bundles: score as the mean over translations within this many pixels/voxels
    # (flows.glow.Translated; (2 r + 1)^ndim times the scoring cost; 0: off)
    test_time_shift: int = 0
    # The spatial axis across which the anatomy is mirror-symmetric (head CT: 2, the patient's
    # left-right); with train_mirror training mirrors each image along it at random (a second,
    # equally normal head for every one), with test_time_mirror scoring averages each image
    # and its mirror image (flows.glow.Translated).
    mirror_axis: int | None = None
    train_mirror: bool = False
    test_time_mirror: bool = False

    @property
    def kind(self) -> str:
        return self.preprocessing.kind

    def with_overrides(self, **kw: object) -> Preset:
        return replace(self, **kw)  # type: ignore[arg-type]


def _cxr(shape: tuple[int, int], n_bits: int = 8) -> Preprocessing:
    # percentiles, not min-max: one hot pixel at twice an image's maximum took a bundle on the
    # alt phantoms from 0.79 to 0.64 AUROC under min-max, 0.80 to 0.79 here (results.md, session 15)
    return Preprocessing(kind="cxr", shape=shape, n_bits=n_bits, intensity="percentile")


def _patches(kind: str, size: int, spacing: float) -> Preprocessing:
    """Cubic patches of ``size`` voxels on an isotropic ``spacing`` (mm) grid, CT windows."""
    if kind == "bct":
        return Preprocessing(kind="bct", shape=(size,) * 3, n_bits=7, intensity="window",
                             window=BCT_WINDOW, spacing=spacing)
    return Preprocessing(kind=kind, shape=(size,) * 3, n_bits=8, intensity="window",
                         window=CHESTCT_WINDOW, spacing=spacing)


def _bct(shape: tuple[int, int, int], n_bits: int = 7) -> Preprocessing:
    return Preprocessing(kind="bct", shape=shape, n_bits=n_bits, intensity="window", window=BCT_WINDOW)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("paper-cxr", "Shibata et al. CXR: 512x512, L7 K32, width 512 (GPU)",
               GlowConfig(1, 2, levels=7, steps=32, hidden=512, scale_fn="paper", checkpoint=True),
               _cxr((512, 512)), batch_size=128, lr=1e-3, epochs=200),
        Preset("paper-bct", "Shibata et al. head CT: 32x128x128, L4 K32, width 512, 7-bit (GPU)",
               GlowConfig(1, 3, levels=4, steps=32, hidden=512, scale_fn="paper", checkpoint=True),
               _bct((32, 128, 128)), batch_size=1, lr=1e-4, epochs=200, mirror_axis=2),
        Preset("ct3dflow", "CT-3DFlow chest-CT patches: 48^3 at 2 mm, L4 K64 (GPU)",
               # 48 is divisible by 2**4.
               GlowConfig(1, 3, levels=4, steps=64, hidden=512, scale_fn="glow", checkpoint=True),
               _patches("chestct", 48, 2.0),
               batch_size=8, lr=1e-4, epochs=100, weight_decay=1e-5),
        # CPU presets: the best settings of the sweep in docs/results.md that fit the
        # 15-minute budget: 5-bit data, a shared base, the two finest levels kept shared.
        Preset("cpu-cxr", "small CXR model for a 2-core CPU: 64x64 at 5 bits, L4 K8, width 96",
               GlowConfig(1, 2, levels=4, steps=8, hidden=96, scale_fn="paper"),
               _cxr((64, 64), n_bits=5), batch_size=32, lr=1e-3, epochs=2, warmup_steps=100,
               finetune_epochs=3, finetune_lr=2e-4, finetune_freeze=2, strategy="shared",
               # the training length of 1500 + 1500 radiographs; 300 + 300 trained as long: posterior
               # AUROC 0.50 -> 0.55, on the alt phantoms 0.57 -> 0.79 (results.md, session 15)
               min_steps=160, finetune_min_steps=110,
               # weight averaging: seed-to-seed AUROC spread 0.549-0.625 -> 0.570-0.605 (results.md)
               ema_decay=0.98,
               # scores averaged over the 9 one-pixel translations: +0.04 to +0.07 AUROC (results.md)
               test_time_shift=1),
        # 5 bits and the two finest levels shared, as for CXR: posterior AUROC 0.49 -> 0.49-0.58
        # over three training seeds, its correlation with the zero fraction 0.49 -> 0.10-0.36
        # (results.md, sessions 8-12)
        Preset("cpu-bct", "small head-CT model for a 2-core CPU: 16x64x64 at 5 bits, L3 K6, width 48",
               GlowConfig(1, 3, levels=3, steps=6, hidden=48, scale_fn="paper"),
               _bct((16, 64, 64), n_bits=5), batch_size=8, lr=1e-3, epochs=3, warmup_steps=100,
               finetune_epochs=2, finetune_lr=2e-4, finetune_freeze=2, strategy="shared", mirror_axis=2,
               min_steps=380, finetune_min_steps=120),  # the training length of 600 + 600 volumes
        Preset("cpu-chestct", "small chest-CT patch model for a 2-core CPU: 16^3 at 4 mm, L2 K6, width 48",
               GlowConfig(1, 3, levels=2, steps=6, hidden=48, scale_fn="glow"),
               _patches("chestct", 16, 4.0),
               batch_size=32, lr=1e-3, epochs=2, weight_decay=1e-5, warmup_steps=100,
               finetune_epochs=2, finetune_lr=2e-4, strategy="shared",
               min_steps=410, finetune_min_steps=190),  # the training length of 60 + 60 volumes
        Preset("cpu-bct-patch", "small head-CT patch model for a 2-core CPU: 8^3 at 4 mm, L2 K6, width 48",
               GlowConfig(1, 3, levels=2, steps=6, hidden=48, scale_fn="paper"),
               _patches("bct", 8, 4.0),
               batch_size=64, lr=1e-3, epochs=2, weight_decay=1e-5, warmup_steps=100,
               finetune_epochs=2, finetune_lr=2e-4, strategy="shared",
               min_steps=340, finetune_min_steps=160),  # the training length of 100 + 100 volumes
        Preset("tiny-cxr", "a toy model for unit tests: 16x16, L2 K2, width 16",
               GlowConfig(1, 2, levels=2, steps=2, hidden=16, scale_fn="paper"),
               _cxr((16, 16)), batch_size=16, lr=1e-3, epochs=2, warmup_steps=5,
               finetune_epochs=1, finetune_lr=5e-4, strategy="conditional"),
        Preset("tiny-chestct", "a toy chest-CT patch model for unit tests: 8^3 at 8 mm, L2 K1, width 8",
               GlowConfig(1, 3, levels=2, steps=1, hidden=8, scale_fn="glow"),
               _patches("chestct", 8, 8.0),
               batch_size=32, lr=1e-3, epochs=1, warmup_steps=5, finetune_epochs=1,
               finetune_lr=5e-4, strategy="shared"),
        Preset("tiny-bct", "a toy model for unit tests: 8x16x16, L2 K2, width 8",
               GlowConfig(1, 3, levels=2, steps=2, hidden=8, scale_fn="paper"),
               _bct((8, 16, 16)), batch_size=4, lr=1e-3, epochs=2, warmup_steps=5,
               finetune_epochs=1, finetune_lr=5e-4, mirror_axis=2),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
