"""Dataset names: one of `DATASET_INFO` (qg.targets.sources), or one of them relabelled, named by
one character per class after `~`: the class's new label, or `-` to leave its images out.

A binary task (RPG Sec. 4) is `relabelled("fashion_mnist", "0110001011")` =
`fashion_mnist~0110001011`: the same images, two classes. A class split is
`fashion_mnist~01234-----` (the first five classes, labels kept) and `fashion_mnist~-----01234`
(the other five, labelled 0-4): the cpu profile pretrains on the one and trains the head-only task
on the other, so that task's 5,000 test images are of classes the backbone never saw.
"""

from __future__ import annotations

from .sources import DATASET_INFO

IN_MEMORY = ("fashion_mnist", "digits", "cifar10", "cifar100")  # decoded into an ImageTensorDataset
RELABEL = "~"  # dataset name ~ embedding: one character per class, its new label or DROP
DROP = "-"  # the class's images are left out


def relabelled(name: str, embedding: str) -> str:
    """The name of dataset `name` relabelled by `embedding`: class c becomes int(embedding[c]), or
    is left out where embedding[c] is `DROP` (RPG's binary tasks, class splits; the labels used
    must be 0, 1, ..., at least two of them)."""
    full = f"{name}{RELABEL}{embedding}"
    check_name(full)
    return full


def split_name(name: str) -> tuple[str, str | None]:
    """(base dataset, embedding or None) of a dataset name."""
    base, _, embedding = name.partition(RELABEL)
    return base, embedding or None


def dataset_info(name: str) -> dict:
    """`num_classes`, `in_chans`, `img_size`, `mean` and `std` of a dataset, enough to build its
    model."""
    check_name(name)
    base, embedding = split_name(name)
    return {
        **DATASET_INFO[base],
        **({"num_classes": len(labels_of(embedding))} if embedding else {}),
    }


def labels_of(embedding: str) -> set[str]:
    """The labels a relabelling uses (its characters less `DROP`)."""
    return set(embedding) - {DROP}


def check_name(name: str) -> str:
    """`name` when it is a known dataset or a valid relabelling of one; else an error saying the
    rule."""
    base, embedding = split_name(name)
    if base not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_INFO)}")
    if embedding is None:
        return name
    classes, labels = DATASET_INFO[base]["num_classes"], labels_of(embedding)
    if (
        base not in IN_MEMORY
        or len(embedding) != classes
        or len(labels) < 2
        or labels != {str(i) for i in range(len(labels))}
    ):
        raise ValueError(
            f"{name!r} is not a relabelling: relabel one of {sorted(IN_MEMORY)} by one character "
            f"per class ({classes} for {base}), the class's new label (0, 1, ... with none "
            f"skipped, at least two) or {DROP!r} to leave it out, e.g. {base}~0110001011 "
            f"(a binary task) or {base}~01234{DROP * (classes - 5)} (its first five classes)"
        )
    return name
