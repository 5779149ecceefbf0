"""The papers' own numbers (QuantGen, Tables 1-6 and 10; RPG, Tables 1 and 9), printed beside ours
in every table.

Our tasks are scaled-down counterparts of the paper's settings, so the comparison is of trends (does
Gen beat PTQ, where does it break), never of absolute accuracies: `full` (full fine-tuning) stands
for the paper's ImageNet-1K setting and `head` (frozen features, head-only transfer) for its
CIFAR-10 setting.
"""

from __future__ import annotations

# Our task and architecture names -> the paper's: the cpu/smoke profiles' counterparts, then the
# paper profile's own.
COUNTERPART = {
    "full": "ImageNet-1K",
    "head": "CIFAR-10",
    "imagenet": "ImageNet-1K",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
}
MODEL = {
    "vit": "ViT-Tiny",
    "mixer": "MLP-Mixer",
    "vit_tiny": "ViT-Tiny",
    "vit_small": "ViT-Small",
    "vit_base": "ViT-Base",
    "mlp_mixer": "MLP-Mixer",
}

# Table 1 columns: group-wise at 8..3 bits, then channel and group at 8 bits.
TABLE1_COLUMNS = ("8-bit", "7-bit", "6-bit", "5-bit", "4-bit", "3-bit", "Channel", "Group")
TABLE1 = {
    ("CIFAR-10", "ViT-Tiny"): {
        "PTQ": (97.17, 97.17, 97.08, 96.90, 96.02, 86.46, 97.17, 97.17),
        "Gen": (97.27, 97.26, 97.21, 97.02, 96.27, 87.13, 97.26, 97.27),
    },
    ("CIFAR-10", "MLP-Mixer"): {
        "PTQ": (96.56, 96.54, 96.54, 96.44, 96.24, 92.67, 96.57, 96.56),
        "Gen": (96.61, 96.64, 96.61, 96.49, 96.33, 93.27, 96.64, 96.61),
    },
    ("CIFAR-100", "ViT-Tiny"): {
        "PTQ": (78.54, 78.34, 78.25, 77.01, 72.14, 38.90, 78.44, 78.54),
        "Gen": (78.80, 78.73, 78.51, 77.48, 72.54, 38.76, 78.68, 78.80),
    },
    ("CIFAR-100", "MLP-Mixer"): {
        "PTQ": (96.49, 96.52, 96.45, 96.45, 96.01, 93.31, 96.50, 96.49),
        "Gen": (96.64, 96.70, 96.59, 96.64, 96.34, 93.71, 96.65, 96.64),
    },
    ("ImageNet-1K", "ViT-Tiny"): {
        "PTQ": (74.83, 74.84, 74.74, 74.21, 71.73, 53.17, 74.83, 74.83),
        "Gen": (75.42, 75.41, 75.26, 74.68, 72.04, 53.03, 75.06, 75.42),
    },
    ("ImageNet-1K", "ViT-Small"): {
        "PTQ": (81.42, 81.42, 81.33, 81.06, 80.19, 72.53, 81.41, 81.42),
        "Gen": (81.50, 81.49, 81.45, 81.34, 80.34, 72.70, 81.51, 81.50),
    },
    ("ImageNet-1K", "ViT-Base"): {
        "PTQ": (84.56, 84.54, 84.54, 84.44, 84.06, 81.81, 84.56, 84.56),
        "Gen": (84.70, 84.70, 84.61, 84.64, 84.32, 82.17, 84.27, 84.70),
    },
}

# Table 2: ImageNet-1K ViT-Tiny, group-wise; accuracy (%) and time (minutes) for 50 models.
TABLE2 = {"QAT": {4: (72.23, 1000), 8: (75.61, 1000)}, "Gen": {4: (71.78, 300), 8: (75.73, 300)}}

# Table 3: ViT-Tiny; conditional generators ("P": one-hot over precision, "G": over granularity).
TABLE3 = {
    "CIFAR-10": {
        "P": (97.24, 97.23, 97.19, 96.97, 96.20, 86.85, None, None),
        "G": (None,) * 6 + (97.21, 97.27),
    },
    "CIFAR-100": {
        "P": (78.64, 78.51, 78.45, 77.42, 72.27, 39.14, None, None),
        "G": (None,) * 6 + (78.63, 78.75),
    },
    "ImageNet-1K": {
        "P": (75.21, 75.12, 74.96, 74.75, 72.28, 53.38, None, None),
        "G": (None,) * 6 + (75.23, 75.45),
    },
}

# Ablations, all ImageNet-1K; Table 4 is ViT-Base, group-wise, 8..3 bits.
TABLE4 = {
    "Original": (84.56, 84.54, 84.54, 84.44, 84.06, 81.81),
    "Gen 8192": (83.92, 58.25, 54.76, 59.04, 55.32, 56.56),
    "Gen 16384": (84.70, 84.70, 84.61, 84.64, 84.32, 82.17),
}
TABLE5 = {"Original (PTQ)": 74.83, "+ diffusion": "fail", "- diffusion": 75.42}
TABLE6 = {"Original (PTQ)": 74.83, "zero": 74.57, "one": 72.94, "gaussian": 75.42}
TABLE10 = {
    "lstm": (0.10, 14.5, 4.03),
    "transformer": (0.18, 3.78, 3.53),
    "mamba2": (75.42, 3.67, 3.05),
}


# RPG (Wang et al.), Table 1: ImageNet-1K ViT-Tiny, 50 original checkpoints, generated models'
# statistics (%).
RPG_TABLE1 = {
    "ViT-Tiny": {
        "original": 74.9,
        "best": 75.4,
        "mean": 75.3,
        "min": 75.2,
        "median": 75.3,
        "std": 0.1,
    }
}
# RPG Tables 9 and 14: ViT-Tiny binary classifiers on CIFAR-10 (a 10-bit embedding assigns each
# class 0 or 1), unseen embeddings: original accuracy and the generated models' best, average and
# std (%); Table 9 shows the first ten (original, best). Their generator makes the two-layer
# classification head (38,976 parameters).
RPG_TABLE14 = {
    "0100010111": (97.3, 94.4, 93.9, 0.6),
    "0111110110": (98.1, 96.6, 94.9, 2.1),
    "0011101110": (97.4, 95.0, 94.2, 1.1),
    "0101111111": (98.4, 96.1, 95.8, 0.3),
    "0010000000": (98.9, 96.6, 95.2, 2.3),
    "0001100101": (96.7, 92.9, 91.6, 1.1),
    "1111101001": (97.6, 94.8, 94.1, 0.7),
    "1010000011": (98.1, 95.7, 91.8, 3.7),
    "0100010110": (97.1, 93.6, 90.7, 4.3),
    "1100011001": (97.0, 94.0, 90.1, 3.6),
    "1010001101": (97.3, 91.3, 90.7, 0.8),
    "0111100010": (96.3, 95.4, 89.4, 6.3),
    "1101110100": (97.6, 92.6, 90.5, 3.2),
    "0111001110": (96.3, 90.8, 89.1, 1.9),
    "0100111010": (96.3, 91.9, 88.4, 4.4),
    "0010001101": (97.5, 93.7, 88.0, 5.6),
    "0001101111": (96.5, 90.8, 85.5, 7.0),
    "1001001101": (96.4, 86.7, 83.7, 3.6),
    "1001010000": (91.7, 85.6, 83.2, 2.0),
    "0011000101": (96.3, 90.2, 79.2, 9.6),
}


def table1_column(bits: int, granularity: str, group_bits: int = 8) -> list[str]:
    """The Table 1 columns a (bits, granularity) result fills: a precision column and/or a
    granularity one."""
    cols = [f"{bits}-bit"] if granularity == "group" else []
    if bits == group_bits:
        cols.append(granularity.capitalize())
    return cols


def table1_value(task: str, arch: str, method: str, column: str) -> float | None:
    """The paper's Table 1 number for our (task, arch) counterpart, or None where the paper has
    none."""
    row = TABLE1.get((COUNTERPART.get(task), MODEL.get(arch)), {}).get(method)
    return None if row is None else row[TABLE1_COLUMNS.index(column)]
