"""Optional training side of normscore: RNA (long-tail), Separation (PFS) and baselines.

Nothing in the scoring path imports this package; import it explicitly::

    from normscore import finetune as ft

    lt, counts = ft.long_tail_subset(get_dataset("fashion-mnist", "train"), rho=0.01)
    aux = ft.aux_ood_dataset(channels=1, image_size=28)
    res = ft.finetune(model, lt, ft.FinetuneConfig.preset("rna", epochs=20), aux_ood=aux, out_dir="runs/rna")
    normscore.create("penultimate_norm").attach(res.model).score(x)   # RNA's test-time score

See ``docs/finetune.md`` for the methods, the command line (``normscore-finetune``) and the
Fashion-MNIST(-LT) evidence.
"""

from .aux_ood import AUX_SOURCES, aux_ood_dataset, aux_ood_images
from .bn import batchnorm_layers, make_bn_non_affine
from .evaluate import accuracy_report, ood_report, predict_scores
from .longtail import long_tail_counts, long_tail_indices, long_tail_subset, shot_accuracy, shot_groups
from .losses import (
    ProjectionHead,
    class_prior,
    clustering_loss,
    logit_adjusted_ce,
    outlier_exposure_loss,
    rna_loss,
    separation_loss,
)
from .train import (
    METHODS,
    FinetuneConfig,
    FinetuneResult,
    augment_batch,
    finetune,
    load_finetuned,
    method_loss,
    penultimate_with_grad,
    read_run,
)

__all__ = [
    "AUX_SOURCES",
    "METHODS",
    "FinetuneConfig",
    "FinetuneResult",
    "ProjectionHead",
    "accuracy_report",
    "augment_batch",
    "aux_ood_dataset",
    "aux_ood_images",
    "batchnorm_layers",
    "class_prior",
    "clustering_loss",
    "finetune",
    "load_finetuned",
    "logit_adjusted_ce",
    "long_tail_counts",
    "long_tail_indices",
    "long_tail_subset",
    "make_bn_non_affine",
    "method_loss",
    "ood_report",
    "outlier_exposure_loss",
    "penultimate_with_grad",
    "predict_scores",
    "read_run",
    "rna_loss",
    "separation_loss",
    "shot_accuracy",
    "shot_groups",
]
