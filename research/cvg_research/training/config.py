"""What `cvg train-classifier` reads and how it trains: plain data (no torch), so the command line builds
them without loading the model stack."""

from __future__ import annotations

from dataclasses import dataclass

from cvg.request import documented


@dataclass(frozen=True)
class ReadingConfig:
    """Where the classifier reads: the guided steps of a sampling schedule, and how maps are recorded.

    source "trajectory": the generator's own samples from Gaussian noise, read at the latents the sampler
    passes through and labelled by the judge on the decoded clip (`read_trajectory`); "inversion": clips
    inverted to the guided steps' noise levels (`read_clip`)."""

    source: str = documented(
        "trajectory",
        "read the generator's own samples along its sampling trajectory, "
        "labelled by the judge (trajectory), or clips inverted to the guided steps' noise levels",
    )
    num_inference_steps: int = documented(20, "sampling steps whose guided steps are read")
    guide_steps: int = documented(4, "first steps read, where guidance may act")
    substeps: int = 4  # Euler steps of the inversion per noise interval
    pool: tuple[int, int, int] = (1, 2, 2)
    layers: tuple[int, ...] | None = None  # None: every block
    max_sequence_length: int = 512


@dataclass(frozen=True)
class TrainingConfig:
    # A few hundred judged trajectories overfit a wide head (training AUROC 1.0, held-out near chance):
    # small, strongly decayed and briefly trained (docs/classifier.md). The inversion recipe was 30 epochs,
    # 256 wide, weight decay 1e-4.
    dual: bool = True  # False: only readings under the true prompt (the ablation)
    epochs: int = documented(5, "epochs of the head")
    batch: int = 256
    lr: float = 1e-3
    hidden_dim: int = documented(32, "width of the head's two MLPs")
    # Targets eps/2 and 1 - eps/2: a confident head keeps a gradient to guide with.
    label_smoothing: float = documented(0.1, "label smoothing of the head's targets")
    weight_decay: float = documented(0.3, "AdamW weight decay")
    timestep_conditioned: bool = True  # the head sees the noise level it reads at (it guides at several)
    objective: str = documented(
        "binary",
        "binary: each label scored alone (cross-entropy on the true and the counterfactual label); multiclass: "
        "the label shown against its family (the other relations, directions, counts or binding), softmax",
        choices=("binary", "multiclass"),
    )
    seed: int = 0
