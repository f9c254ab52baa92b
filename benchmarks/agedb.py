"""The AgeDB-DIR training age distribution, for realistic benchmark labels.

``AGEDB_DIR_TRAIN_COUNTS`` maps each age to its number of training images: the histogram of the
12,208 AgeDB-DIR training labels of the DIR benchmark (Yang et al., ICML 2021), computed once;
the benchmarks read no label file.
"""

import torch

__all__ = [
    "AGEDB_DIR_TRAIN_COUNTS",
    "BUCKET_START",
    "BUCKET_NUM",
    "NUM_BUCKETS",
    "sample_ages",
    "benchmark_ages",
    "ages_to_buckets",
]

# age -> number of AgeDB-DIR training images (12,208 in all; no image of age 0 or 2)
AGEDB_DIR_TRAIN_COUNTS = {
    1: 1, 3: 4, 4: 2, 5: 2, 6: 4, 7: 5, 8: 4, 9: 2, 10: 5, 11: 8, 12: 6, 13: 8, 14: 9, 15: 15,
    16: 18, 17: 28, 18: 60, 19: 50, 20: 101, 21: 103, 22: 123, 23: 152, 24: 199, 25: 224, 26: 215,
    27: 244, 28: 287, 29: 253, 30: 325, 31: 256, 32: 318, 33: 278, 34: 302, 35: 353, 36: 287,
    37: 310, 38: 322, 39: 261, 40: 326, 41: 260, 42: 296, 43: 265, 44: 221, 45: 282, 46: 227,
    47: 229, 48: 251, 49: 207, 50: 257, 51: 227, 52: 250, 53: 190, 54: 198, 55: 234, 56: 167,
    57: 183, 58: 186, 59: 153, 60: 185, 61: 147, 62: 178, 63: 158, 64: 133, 65: 171, 66: 117,
    67: 117, 68: 155, 69: 90, 70: 156, 71: 85, 72: 115, 73: 96, 74: 78, 75: 98, 76: 49, 77: 44,
    78: 46, 79: 26, 80: 31, 81: 26, 82: 24, 83: 19, 84: 15, 85: 20, 86: 13, 87: 10, 88: 7, 89: 7,
    90: 7, 91: 7, 92: 5, 93: 5, 94: 3, 95: 3, 96: 2, 97: 1, 98: 2, 99: 1, 100: 2, 101: 1,
}

# The benchmark's FDS buckets, as the published AgeDB-DIR setting: bucket_num=100,
# bucket_start=3, so ages 3..99 map to buckets 0..96.
BUCKET_START = 3
BUCKET_NUM = 100
NUM_BUCKETS = BUCKET_NUM - BUCKET_START  # 97


def sample_ages(n, generator=None, *, low=None, high=None):
    """``n`` ages drawn with replacement from the AgeDB-DIR training distribution.

    Returns a float32 tensor [n] of integer-valued ages (the published datasets hand FDS float32
    labels).  ``low`` / ``high`` (inclusive) restrict the distribution to that age range.
    ``generator`` is a CPU ``torch.Generator`` (for reproducible draws) or None.
    """
    ages = [a for a in sorted(AGEDB_DIR_TRAIN_COUNTS)
            if (low is None or a >= low) and (high is None or a <= high)]
    if not ages:
        raise ValueError(f"no AgeDB-DIR training age in [{low}, {high}]")
    weights = torch.tensor([float(AGEDB_DIR_TRAIN_COUNTS[a]) for a in ages], dtype=torch.float64)
    pick = torch.multinomial(weights, n, replacement=True, generator=generator)
    return torch.tensor(ages, dtype=torch.float32)[pick]


def benchmark_ages(n, generator=None):
    """``n`` ages in 3..99 (the benchmark's 97 FDS buckets) from the AgeDB-DIR distribution."""
    return sample_ages(n, generator, low=BUCKET_START, high=BUCKET_NUM - 1)


def ages_to_buckets(ages):
    """Bucket index (int64) of each age: ``age - 3`` clamped into 0..96 (FDS bucket_num=100,
    bucket_start=3: ages below 3 join the first bucket, ages above 99 the last)."""
    return (ages.round().long() - BUCKET_START).clamp_(0, NUM_BUCKETS - 1)
